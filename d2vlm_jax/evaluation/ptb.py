"""A Python PTB tokenizer: coco-caption's ``PTBTokenizer`` (the Stanford CoreNLP 3.4.1 jar
run with ``-preserveLines -lowerCase``) without Java, on any text.

Both caption evaluators use it: E.T. Bench's (which replaces every non-ASCII character by a
space first) and the TimeChat-format YouCook2 one (which tokenizes captions as they are).

A maximal-munch lexer after the structure of Stanford's ``PTBLexer`` (JFlex): at each
position the longest match over all rules wins, the earlier rule on ties; a rule's
trailing context (the text after its named group ``tok``) counts for the length but stays
in the input. Literal words match in any case (JFlex ``%caseless``), character classes
only as written. Then each token is normalized as the jar does with its default options:
brackets (``-LRB- -RRB- -LSB- -RSB- -LCB- -RCB-``), LaTeX quotes (`````, ``''``, `` ` ``,
``'``, chosen by the rule and by the quote character), ``--`` for dashes and 3-4 hyphens,
``...`` for ellipses, currency (``€ ¤ → $``, ``£ → #``, ``¢ → cents``), the common
fractions (``½ → 1/2``), ``&amp; &lt; &gt;`` entities, soft hyphens removed, spaces inside
a token (fractions, phone numbers, SGML tags) made non-breaking; finally lower-cased.

Covered: SGML tags (``</evi>`` is one token), numbers with ``. , :`` (``10:00``), dates,
fractions, phone numbers, hyphenated, slashed and underscored words, clitics (``n't 's 're
've 'll 'd 'm``, ``can not``, ``gon na``, ``'t is``), apostrophe words (``o'clock``,
``'90s``, ``rock 'n' roll``), acronyms and abbreviations with the jar's word lists (the
extra sentence-final ``.`` after an acronym before a capitalized function word, or after an
``etc.``-type abbreviation before a capital; ``no.`` only before a number), emoticons, URLs
and e-mail addresses, hashtags and @-names, Unicode letters, digits, marks, spaces,
symbols, quotes and dashes, and the characters the jar deletes (control characters,
private use, characters outside the Basic Multilingual Plane or newer than the jar's
Unicode tables). Line breaks: ``\\n``, ``\\r\\n``, ``\\r``, ``\\x0b``, ``\\x0c``,
``\\u2028``, ``\\u2029`` (``\\x85`` is an ellipsis, as in the jar).

Checked against the jar by ``tools/crosscheck_ptb_tokenizer.py`` (E.T. Bench and YouCook2
captions, character soup, tricky tokens, every Basic Multilingual Plane character in a dozen
contexts; Java 17); the cases in ``tests/data/ptb_tokenizer_cases.json`` were recorded from
the jar. Constructs none of these draw may still come out differently (then the caption
metrics may differ in the last digits): the ``stanford`` back end of
:class:`d2vlm_jax.evaluation.coco_caption.CaptionTokenizer` runs the jar itself.
"""

from __future__ import annotations

import re
import unicodedata

# ------------------------------------------------------------------ character classes

# Code points that Python's Unicode tables (3.11: Unicode 14) class as letters, digits or
# marks but that the jar's older tables do not know: the jar deletes them. Measured with
# the jar on every Basic Multilingual Plane character
# (``tools/crosscheck_ptb_tokenizer.py --all_characters``).
_UNKNOWN_TO_THE_JAR = (
    "037f 0528-052f 0560 0588 05ef 0860-086a 0870-0887 0889-088e 08a1 08ad-08c9 0978 "
    "0980 09fc 0af9 0c34 0c5a 0c5d 0c80 0cdd 0d04 0d54-0d56 0d5f 0de6-0def 0e86 0e89 "
    "0e8c 0e8e-0e93 0e98 0ea0 0ea8-0ea9 0eac 13f5 13f8-13fd 16f1-16f8 170d 171f 1878 "
    "1885-1886 191d-191e 19b0-19c0 19c8-19c9 1b4c 1c80-1c88 1c90-1cba 1cbd-1cbf "
    "1cf2-1cf3 1cfa 2c2f 2c5f 312e-312f 31bb-31bf 4db6-4dbf 9fcd-9fff a698-a69d a78f "
    "a794-a79f a7ab-a7ca a7d0-a7d1 a7d3 a7d5-a7d9 a7f2-a7f7 a8fd-a8fe a9e0-a9e4 "
    "a9e6-a9fe aa7e-aa7f ab30-ab5a ab5c-ab69 ab70-abbf ")


def _ranges(spec: str) -> set[int]:
    points: set[int] = set()
    for item in spec.split():
        low, _, high = item.partition("-")
        points.update(range(int(low, 16), int(high or low, 16) + 1))
    return points


def _char_class(points) -> str:
    """The body of a regex character class holding ``points`` (no brackets)."""
    out, points = [], sorted(points)
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        out.append(f"\\u{points[i]:04x}" if i == j else f"\\u{points[i]:04x}-\\u{points[j]:04x}")
        i = j + 1
    return "".join(out)


_UNKNOWN_POINTS = _ranges(_UNKNOWN_TO_THE_JAR)
# Lower-casing is Java's own (Java 17: Unicode 13), not the lexer's tables: the capitals
# Unicode 14 added keep their case there. Only a token that keeps any character (an e-mail
# address) can hold one: the lexer deletes them elsewhere.
_NOT_LOWERED_BY_JAVA = re.compile("([\u2c2f\ua7c0\ua7d0\ua7d6\ua7d8]+)")


def _bmp(predicate) -> set[int]:
    """The Basic Multilingual Plane code points the jar knows whose character satisfies
    ``predicate``."""
    return {c for c in range(0x10000) if not 0xD800 <= c < 0xE000 and c not in _UNKNOWN_POINTS
            and predicate(chr(c))}


def _lower(token: str) -> str:
    """``token`` lower-cased as the jar does (``String.toLowerCase`` of Java 17)."""
    if token.isascii():
        return token.lower()
    parts = _NOT_LOWERED_BY_JAVA.split(token)  # (odd indices: runs that keep their case)
    return "".join(part if i % 2 else part.lower() for i, part in enumerate(parts))


# (U+1885-U+1886 were letters before Unicode 9 made them marks)
_LETTER_POINTS = _bmp(lambda c: unicodedata.category(c)[0] == "L") | {0x1885, 0x1886}
_L = _char_class(_LETTER_POINTS)                                   # [:letter:]
_D = _char_class(_bmp(lambda c: unicodedata.category(c) == "Nd"))  # [:digit:]
_UPPER = _char_class(_bmp(str.isupper))                             # [:uppercase:]
_LD = _L + _D
# Marks and modifiers that count as word characters, besides the letters (soft hyphen too).
_WORD_EXTRA = _char_class(_ranges(
    "00ad 0237-024f 02c2-02c5 02d2-02df 02e5-02ff 0300-036f 0370-037d 0384 0385 03cf 03f6"
    " 03fc-03ff 0483-0487 04cf 04f6-04ff 0510-0525 055a-055f 0591-05bd 05bf 05c1 05c2 05c4"
    " 05c5 05c7 0615-061a 063b-063f 064b-065e 0670 06d6-06ef 06fa-06ff 070f 0711 0730-074f"
    " 0750-077f 07a6-07b1 07ca-07f5 07fa 0900-0903 093c 093e-094e 0951-0955 0962 0963"
    " 0981-0983 09bc-09c4 09c7 09c8 09cb-09cd 09d7 09e2 09e3 0a01-0a03 0a3c 0a3e-0a4f"
    " 0a81-0a83 0abc-0acf 0b82 0bbe-0bc2 0bc6-0bc8 0bca-0bcd 0c01-0c03 0c3e-0c56 0d3e-0d44"
    " 0d46-0d48 0e30-0e3a 0e47-0e4e 0eb1-0ebc 0ec8-0ecd") - _LETTER_POINTS)
_MISC_SYMBOL = _char_class(_ranges(
    "2b 25 26 7e 5e 7c 5c a6 a7 a8 a9 ac ae af b0-ba d7 f7 387 5be 5c0 5c3 5c6 5f3 5f4"
    " 600-603 606-60a 60c 614 61b 61e 66a 66d 703-70d 7f6-7f8 964 965 e4f 1fbd 2016 2017"
    " 2020-2023 2030-2038 203b 203e-2042 2044 207a-207f 208a-208e 2100-214f 2190-21ff"
    " 2200-2bff 3012 30fb ff01-ff0f ff1a-ff20 ff3b-ff40 ff5b-ff65"))

_SPACE = "[ \\t\\u00a0\\u2000-\\u200a\\u3000]"
_SPACENL = "[ \\t\\u00a0\\u2000-\\u200a\\u3000\\n\\r\\x0b\\x0c\\u2028\\u2029]"
# What the lexer skips, one JFlex match at a time: a line break, a run of spaces, one
# zero-width or NUL character, "&nbsp;". A token that starts on one of these characters
# (only a likely URL can) wins when it is longer.
_SKIPPED = re.compile("(?P<line_break>\r\n|[\n\r\x0b\x0c\u2028\u2029])|[ \t\u00a0\u2000-\u200a\u3000]+"
                      "|[\x00\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)")


def _ci(word: str) -> str:
    """A literal that matches in any case (the lexer is ``%caseless``)."""
    return "(?i:" + word + ")"


# ---------------------------------------------------------------------------- rules

_APOS = "(?:['\\u0092\\u2019]|" + _ci("&apos;") + ")"
_APOSETC = "(?:['`\\u0091\\u0092\\u2018\\u2019\\u201b]|" + _ci("&apos;") + ")"
_XML_NAME = "[A-Za-z][A-Za-z0-9_:.-]*"
_SGML = (f"<(?:[!?][A-Za-z-][^>\\r\\n]*|/{_XML_NAME}|{_XML_NAME}(?: +(?:{_XML_NAME}"
         f"(?: *= *(?:'[^']*'|\"[^\"]*\"))?))* */?) *>")  # (a quoted value may hold a line break)
_SPLET = "&[aeiouAEIOU]" + _ci("(?:acute|grave|uml)") + ";"
_LETTER = f"(?:[{_L}{_WORD_EXTRA}]|{_SPLET})"
_WORD = f"{_LETTER}(?:{_LETTER}|[{_D}])*(?:[.!?]{_LETTER}(?:{_LETTER}|[{_D}])*)*"  # "a1", "Yahoo!x"
_NUM = f"(?:[{_D}]*(?:[.:,\\u00ad\\u066b\\u066c][{_D}]+)+|[{_D}]+)"
_ACRO = "[A-Za-z](?:\\.[A-Za-z])+"
_ACRO1 = "[A-Za-z](?:\\.[A-Za-z])*"  # (one letter too: "I." before "The" is "I" and ".")
_HYPHEN = "[-_\\u058a\\u2010\\u2011]"
_THING = (f"(?:[dDoOlL]{_APOSETC}[{_LD}])?[{_LD}]+"
          f"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}[{_LD}])?[{_LD}]+)*")
_HTHING = "[A-Za-z0-9][A-Za-z0-9.,\\u00ad]*(?:-(?:" + _ACRO + "\\.|[A-Za-z0-9\\u00ad]+))+"
_THINGA = "[A-Z]+(?:(?:[+&]|" + _ci("&amp;") + ")[A-Z]+)+"
_REDAUX = _APOS + "(?:[msdMSD]|" + _ci("re|ve|ll") + ")"
_INSENTP = "[,;:\\u3001]"

_ABBREV1 = _ci("jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
               "|ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb"
               "|nev|okla|penn|tenn|va|vt|wisc?|wyo|ct|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp"
               "|bhd|assn|univ|intl|sys|bldg|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\\.d|blvd"
               "|rd|esq|etc|al|seq") + "|Az|Ark|Del|Ill|La|Mass|Miss|Ore|Pa|Tex|Wash"
_ABBREV1 = "(?:" + _ABBREV1 + ")\\."
_ABBREV4 = ("(?:" + _ACRO + "|" + _ci("a\\.k\\.a|messrs|lieut|treas|attys?|profs?|supts?|capt"
            "|brig|co?mdr|alex|invt|elec|natl|mrs|drs?|sens?|reps?|govs?|adm|rev|maj|sgt"
            "|cpl|pvt|ste?|ave|pres|hon|pfc|spc|det|cie|m[ft]g|col|gen|mr|ms|lt|mt|vs|wm"
            "|jos|cf|mlle|mme|dept|ft|ph|adj|adv|asst|assoc|ens|insp|msgr|sfc") + "|Miss|[A-Za-z])")
_ABNUM = _ci("nos?|prop|art|pp|op|ca|figs?") + "\\."
# (capitalized: the first letter as written, the rest in any case -- "AT" counts too)
_SENTENCE_WORDS = "(?:" + "|".join(word[0] + _ci(word[1:]) if len(word) > 1 else word for word in (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last"
    " Many More Mr\\. Ms\\. Now Once One Other Our She Since So Some Such That The Then There"
    " These They This We When While What Yet You").split()) + ")"
_SENTEND = f"{_SPACENL}(?:{_SPACENL}|[{_UPPER}]|{_SGML})"

# (name, pattern): the group "tok" (if any) is the token, the rest of the match is
# trailing context. Order = priority on equal lengths.
_RULES = [
    ("prog_lang", _ci("c\\+\\+|[cf]#")),
    ("cannot", "(?P<tok>" + _ci("can") + ")" + _ci("not")),
    ("assimilation", ["(?P<tok>" + _ci("gon|wan") + ")" + _ci("na"),
                      "(?P<tok>" + _ci("got") + ")" + _ci("ta"),
                      "(?P<tok>" + _ci("lem|gim") + ")" + _ci("me"),
                      "(?P<tok>'" + _ci("t") + ")" + _ci("is|was")]),
    ("sgml", _SGML),
    ("dash", _ci("&(?:md|mdash|ndash);") + "|[\\u0096\\u0097\\u2013\\u2014\\u2015]"),
    ("amp", _ci("&amp;")),
    ("sppunc", _ci("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);")),
    ("word_redaux", f"(?P<tok>{_WORD}){_REDAUX}"),
    ("sword_nt", "(?P<tok>[A-Za-z\\u00ad]*[A-MO-Za-mo-z]\\u00ad*)" + _ci("n") + _APOSETC
                 + _ci("t")),
    ("word", _WORD),
    ("apoword", [_APOS + _ci("n") + _APOS + "?", "[lLdDjJ]" + _APOS, _ci("dunkin|somethin|ol") + _APOS,
                 _APOS + _ci("em"), f"[A-HJ-XZn]{_APOSETC}[{_L}]{{2}}[{_L}]*",
                 _APOS + "[2-9]0" + _ci("s"), _APOS + _ci("till?"),
                 f"[{_L}]+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z][{_L}]*", _APOS + _ci("cause"),
                 _ci("cont'd\\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
                 _ci("o") + _APOSETC + _ci("o")]),
    ("apoword2", "(?P<tok>[yY]" + _APOS + f")[{_L}]"),
    ("fullurl", _ci("https?://") + "[^ \\t\\n\\f\\r\"<>|()]+[^ \\t\\n\\f\\r\"<>|.!?(){},-]"),
    # (",-_" is a character RANGE in the Java lexer's class, kept as one here)
    ("likelyurl", "(?:(?:" + _ci("www") + "\\.(?:[^ \\t\\n\\f\\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})"
                  "|(?:(?:[^ \\t\\n\\f\\r\"`'<>|.!?(){},-_$]+\\.)+" + _ci("com|net|org|edu") + "))"
                  "(?:/[^ \\t\\n\\f\\r\"<>|()]+[^ \\t\\n\\f\\r\"<>|.!?(){},-])?"),
    ("email", "(?:<|" + _ci("&lt;") + ")?[a-zA-Z0-9][^ \\t\\n\\f\\r\"<>|(){}\\u00a0]*@"
              "(?:[^ \\t\\n\\f\\r\"<>|(){}.\\u00a0]+\\.)*[^ \\t\\n\\f\\r\"<>|(){}.\\u00a0]+"
              "(?:>|" + _ci("&gt;") + ")?"),
    ("twitter", ["@[a-zA-Z_][a-zA-Z_0-9]*", f"#{_LETTER}+"]),
    ("redaux", f"(?P<tok>{_REDAUX})(?:[^A-Za-z]|$)"),
    ("sredaux", _ci("n") + _APOSETC + _ci("t")),
    ("date", f"[{_D}]{{1,2}}[-/][{_D}]{{1,2}}[-/][{_D}]{{2,4}}"),
    ("number", "[-+]?" + _NUM),
    ("subsupnum", "[\\u207a\\u207b\\u208a\\u208b]?(?:[\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079]+"
                  "|[\\u2080-\\u2089]+)"),
    ("frac", f"(?:[{_D}]{{1,4}}[- \\u00a0])?[{_D}]{{1,4}}(?:\\\\?/|\\u2044)[{_D}]{{1,4}}"),
    ("frac2", "[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]"),
    ("tbspec", ["-" + _ci("(?:RRB|LRB|RCB|LCB|RSB|LSB)") + "-", _ci("C\\.D\\.s|pro-|anti-"),
                _ci("S(?:&|&amp;)P-500"), _ci("S(?:&|&amp;)Ls"), _ci("cap") + _APOS + _ci("n"),
                _ci("c") + _APOS + _ci("est")]),
    ("thing3", "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),
    ("dolsign", "[A-Z]*\\$|#"),
    ("dolsign2", "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4"
                 "\\uffe0\\uffe1\\uffe5\\uffe6]"),
    ("acronym_end", f"(?P<tok>{_ACRO1}\\.){_SPACENL}+(?:{_SENTENCE_WORDS}|{_SGML}){_SPACENL}"),
    # (a sentence end too at the end of the text: the next two characters are missing)
    ("pty_ltd", f"(?P<tok>{_ci('(?:pt[ey]|co)')}\\.){_SPACE}{_ci('ltd|lim')}"),  # no sentence end
    ("abbrev1_end", [f"(?P<tok>{_ABBREV1}){_SENTEND}", f"(?P<tok>{_ABBREV1})[\\s\\S]?\\Z"]),
    # (two characters of trailing context: "Co.x" is "Co." and "x", not a dotted word)
    ("abbrev1", f"(?P<tok>{_ABBREV1})[\\s\\S]{{2}}"),
    ("abbrev2", _ABBREV4 + "\\."),
    ("abnum", f"(?P<tok>{_ABNUM}){_SPACENL}?[{_D}]"),
    ("abbrev4", f"(?P<tok>{_ABBREV4}){_SPACE}"),
    ("acro", f"(?P<tok>{_ACRO}){_SPACENL}"),
    ("tbspec2", f"(?P<tok>{_APOS}[0-9][0-9]){_SPACENL}"),
    ("filename", f"(?P<tok>[{_LD}\\u00ad]+(?:\\.[{_LD}\\u00ad]+)*\\." + _ci("(?:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?"
                 "|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
                 + f")(?:{_SPACENL}|[.?!,])"),
    ("word_dot", f"(?P<tok>{_WORD}\\.){_INSENTP}"),
    ("phone", "(?:\\([0-9]{2,3}\\)[ \\u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \\u00a0])?[0-9]{2,4}"
              "[- \\u00a0])[0-9]{3,4}[- \\u00a0]?[0-9]{3,5}"
              "|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}"),
    # (not before a letter or digit, nor at the end of the text)
    ("smiley", "(?P<tok>[<>]?[:;=][\\-o\\*']?[()\\[\\]dDpPO\\\\{@|])[^A-Za-z0-9]"),
    ("asian_smiley", ["[-^x=~<>']_[-^x=~<>']", "\\([-^x=~<>'][_.]?[-^x=~<>']\\)",
                      "\\([\\^x=~<>']-[\\^x=~<>'`]\\)"]),
    ("dblquote_left", "(?P<tok>\"|" + _ci("&quot;") + ")[A-Za-z0-9$]"),
    ("dblquote", "\"|" + _ci("&quot;")),
    ("opbrac", "[<\\[]|" + _ci("&lt;")),
    ("clbrac", "[>\\]]|" + _ci("&gt;")),
    ("lbrace", "\\{"),
    ("rbrace", "\\}"),
    ("lparen", "\\("),
    ("rparen", "\\)"),
    ("hyphens", "-+"),
    ("ldots", ["\\.{3,5}", "(?:\\.[ \\u00a0]){2,4}\\.", "[\\u0085\\u2026]"]),
    ("fnmarks", "@+|#+|_+"),
    ("asts", "\\*+|(?:\\\\\\*){1,3}"),
    ("insentp", _INSENTP),
    ("qmarks", "[?!]+"),
    ("period", "[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]"),
    ("equals", "="),
    ("slash", "/"),
    ("hthing_dot", f"(?P<tok>{_HTHING}\\.){_INSENTP}"),
    ("hthing", _HTHING),
    ("thing_dot", f"(?P<tok>{_THING}\\.){_INSENTP}"),
    ("thing", _THING),
    ("thinga_dot", f"(?P<tok>{_THINGA}\\.){_INSENTP}"),
    ("thinga", _THINGA),
    ("quote_left", "(?P<tok>')[A-Za-z][^ \\t\\n\\r\\u00a0]"),
    ("redaux2", _REDAUX),
    ("quotes", [_APOS, "''", "[`\\u2018\\u2019\\u201a\\u201b\\u201c\\u201d\\u0091\\u0092\\u0093"
               "\\u0094\\u201e\\u201f\\u2039\\u203a\\u00ab\\u00bb]{1,2}"]),
    ("duckfeet", "<<|>>"),
    ("miscsymbol", f"[{_MISC_SYMBOL}]"),
]
_COMPILED = [(name, re.compile(alternative)) for name, pattern in _RULES
             for alternative in ([pattern] if isinstance(pattern, str) else pattern)]
_URL_RULES = [(name, pattern) for name, pattern in _COMPILED if name == "likelyurl"]

# ----------------------------------------------------------------------- normalizing

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_EXTRA_PERIOD = {"acronym_end", "abbrev1_end"}  # the period is lexed again: "etc. ."
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
             "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_LEFT_QUOTES = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
                              "\u0092": "'", "\u2019": "'", "\u203a": "'", "\u0093": "``",
                              "\u201c": "``", "\u00ab": "``", "\u0094": "''", "\u201d": "''",
                              "\u00bb": "''"})
_QUOTE_RULES = {"redaux", "sredaux", "redaux2", "quotes", "dblquote", "dblquote_left",
                "quote_left"}
_PROBABLY_LEFT = {"dblquote_left", "quote_left"}
_SOFT_HYPHEN_RULES = {"word", "word_redaux", "sword_nt", "number", "word_dot", "hthing",
                      "hthing_dot"}
_AMP = re.compile("(?i)&amp;")


def _latex_quotes(text: str, probably_left: bool) -> str:
    text = re.sub("(?i)&apos;|'", "`" if probably_left else "'", text)
    text = re.sub("(?i)&quot;|\"", "``" if probably_left else "''", text)
    return text.translate(_LEFT_QUOTES)


def _normalize(name: str, text: str) -> str:
    if name in _QUOTE_RULES:
        return _latex_quotes(text, name in _PROBABLY_LEFT)
    if name in _SOFT_HYPHEN_RULES:
        return text.replace("\u00ad", "") or "-"
    if name in ("opbrac", "clbrac"):
        return {"&lt;": "<", "&gt;": ">"}.get(text.lower(), _BRACKETS.get(text, text))
    if name in ("lbrace", "rbrace", "lparen", "rparen"):
        return _BRACKETS[text]
    if name in ("smiley", "asian_smiley"):
        return text.replace("(", "-LRB-").replace(")", "-RRB-")
    if name in ("amp", "thinga", "thinga_dot", "tbspec"):
        return _AMP.sub("&", text)
    if name in ("sgml", "frac", "phone"):
        text = text.replace(" ", "\u00a0")
        return "".join(_BRACKETS.get(c, c) for c in text) if name == "phone" else text
    if name == "dash":
        return "--"
    if name == "hyphens":
        return "--" if 3 <= len(text) <= 4 else text
    if name == "ldots":
        return "..."
    if name == "frac2":
        return _FRACTIONS.get(text, text)
    if name == "dolsign2":
        return _CURRENCY.get(text, text)
    return text


def _token(match: re.Match) -> str:
    return match.group("tok") if "tok" in match.re.groupindex else match.group(0)


def tokenize_lines(text: str) -> list[str]:
    """Tokenized lines of ``text`` (one output line per input line), tokens space-joined
    and lower-cased, punctuation tokens included (as the jar prints them).

    The whole text is lexed as one stream (trailing contexts see the next line, as in the
    Java lexer); a line break ends an output line."""
    lines: list[list[str]] = [[]]
    position, end = 0, len(text)
    while position < end:
        skipped = _SKIPPED.match(text, position)
        best = None  # (length with trailing context, name, token text)
        for name, pattern in _URL_RULES if skipped else _COMPILED:
            match = pattern.match(text, position)
            if match and match.end() > position and (best is None or match.end() - position > best[0]):
                best = (match.end() - position, name, _token(match))
        if skipped and (best is None or best[0] <= skipped.end() - position):
            if skipped.group("line_break"):
                lines.append([])
            position = skipped.end()
            continue
        if best is None:  # untokenizable: deleted, as the Java lexer does by default
            position += 1
            continue
        _, name, token = best
        position += len(token)
        if name == "acronym_end" and len(token) == 2:  # "I." -> "I", then "." again
            token = token[0]
            position -= 1
        elif name in _EXTRA_PERIOD:  # "U.S." -> "U.S.", then "." again
            position -= 1
        lines[-1].append(_normalize(name, token))
    # (a token may hold a line break -- an SGML attribute value -- which the jar prints as is)
    return "\n".join(" ".join(_lower(t) for t in line) for line in lines).split("\n")
