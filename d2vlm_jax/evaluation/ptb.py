"""A Python PTB tokenizer for coco-caption's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1,
``-preserveLines -lowerCase``), without Java.

A maximal-munch lexer after the structure of Stanford's ``PTBLexer`` (longest match over
all rules, the earlier rule on ties, trailing contexts as lookaheads), restricted to ASCII
(E.T. Bench's caption evaluator replaces every non-ASCII character by a space before
tokenizing). Covered: SGML tags (``</evi>`` is one token), numbers with ``. , :``
(``10:00``), hyphenated and slashed words and numbers (``x-ray``, ``3-4``, ``a/b``),
fractions, clitics (``n't 's 're 've 'll 'd 'm``, ``cannot``), acronyms and abbreviations
(``e.g.``, ``u.s.``, ``mr.``, single letters; the extra sentence-final ``.`` after an
acronym before a capitalized function word or after ``etc.``-type abbreviations before a
capital), brackets (``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-``), quotes (````` / ``''``),
ellipses, dash runs, ``&amp;``, emoticons, URLs and e-mail addresses. Line breaks:
``\\n``, ``\\r\\n``, ``\\r``, ``\\x0b``, ``\\x0c``.

It is checked against the jar by ``tools/crosscheck_authors_scoring.py --check_tokenizer``;
rarer constructs of the Java lexer are not reproduced (then the caption metrics may differ
in the last digits): use the ``stanford`` back end (``pycocoevalcap`` + java) for exact
numbers on arbitrary text.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c]")
_SPACE = re.compile(r"[ \t]+")

_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_ABBREV1 = (r"(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
            r"|Ala|Ariz|Ark|Calif|Colo|Conn|Dak|Del|Fla|Ga|Ill|Ind|Kans?|Ky|La|Mass|Md|Mich|Minn"
            r"|Miss|Mo|Mont|Neb|Nev|Okla|Ore|Pa|Penn|Tenn|Tex|Va|Vt|Wash|Wisc?|Wyo|Inc|Cos?|Corp"
            r"|Pp?tys?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys|Nos?|Prop|Ph|tel|est|ext|sq|ft"
            r"|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq)\.")
# (longest alternatives first: Python's alternation is ordered, JFlex's is longest-match)
_ABBREV4 = (r"(?:" + _ACRO + r"|a\.k\.a|Messrs|Lieut|TREAS|Attys?|Profs?|Supts?|Capt|Brig"
            r"|Co?mdr|Alex|Invt|Elec|Natl|Mrs|Miss|Drs?|Sens?|Reps?|Govs?|Adm|Rev|Maj|Sgt|Cpl"
            r"|Pvt|Ste?|Ave|Pres|Hon|Pfc|Spc|Det|Cie|M[ft]g|Col|Gen|Mr|Ms|Lt|Mt|vs|Wm|Jos|cf"
            r"|[A-Za-z])")
_SENTENCE_WORDS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However"
                   "|If|In|It|Last|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some"
                   "|Such|That|The|Then|There|These|They|This|We|When|While|What|Yet|You")
_SGML = r"</?[A-Za-z!][^>\n\r\x0b\x0c]*>"
_NUM = r"(?:\d*(?:[.:,]\d+)+|\d+)"
_WORD = r"[A-Za-z]+"
_APOS = "'"
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:[A-Za-z0-9]+|" + _ACRO + r"\.))+"
_THING = r"(?:[dDoOlL]'[A-Za-z0-9])?[A-Za-z0-9]+(?:[-_](?:[dDoOlL]'[A-Za-z0-9])?[A-Za-z0-9]+)*"

# (name, pattern, flags); the pattern's group "tok" (if any) is the token, the rest of the
# match is trailing context: it counts for the longest match (as in JFlex) and stays in
# the input. Order = priority on equal lengths.
_RULES = [
    ("cannot", r"(?P<tok>can)not", re.I),
    ("gonna", r"(?P<tok>gon|wan)na(?![A-Za-z])|(?P<tok2>got)ta(?![A-Za-z])"
              r"|(?P<tok3>lem|gim)me(?![A-Za-z])", re.I),
    ("tis", r"(?P<tok>'t)(?:is|was)(?![A-Za-z])", re.I),
    ("sgml", _SGML, 0),
    ("amp", r"&amp;", re.I),
    ("sppunc", r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", re.I),
    ("word_redaux", r"(?P<tok>" + _WORD + r")'(?:[msd]|re|ve|ll)", re.I),
    ("sword_nt", r"(?P<tok>[A-Za-z]*[A-MO-Za-mo-z])[nN]'[tT]", 0),
    ("word", _WORD, 0),
    ("apoword", r"'n'?|[lLdDjJ]'|Dunkin'|somethin'|ol'|'em|[A-HJ-XZn]'[A-Za-z]{2}[A-Za-z]*"
                r"|'[2-9]0s|'till?|[A-Za-z][A-Za-z]*[aeiouyAEIOUY]'[aeiouA-Z][A-Za-z]*|'cause"
                r"|cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l", re.I),
    ("apoword2", r"(?P<tok>[yY]')[A-Za-z]", 0),
    ("fullurl", r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", re.I),
    # (",-_" is a character RANGE in the Java lexer's class, kept as one here)
    ("likelyurl", r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
                  r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu)))"
                  r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", re.I),
    ("email", r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()]*@(?:[^ \t\n\f\r\"<>|().]+\.)+[a-zA-Z]{2,4}", 0),
    ("redaux", r"(?P<tok>'(?:[msd]|re|ve|ll))(?:[^A-Za-z]|$)", re.I),
    ("sredaux", r"[nN]'[tT]", 0),
    ("date", r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", 0),
    ("number", r"[-+]?" + _NUM, 0),
    ("frac", r"(?:\d{1,4}[- ])?\d{1,4}\\?/\d{1,4}", 0),
    ("tbspec", r"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"
               r"|Cap'n|c'est", re.I),
    ("thing3", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", 0),
    ("dolsign", r"[A-Za-z]*\$|#", 0),
    ("acronym_end", r"(?P<tok>" + _ACRO + r"\.)[ \t\n\r\x0b\x0c]+(?:" + _SENTENCE_WORDS + r")[ \t]", 0),
    ("acronym_sentend", r"(?P<tok>" + _ACRO + r"\.)[ \t\n\r\x0b\x0c]" + _SGML, 0),
    ("abbrev1_end", r"(?P<tok>(?i:" + _ABBREV1 + r"))[ \t\n\r\x0b\x0c](?:[ \t\n\r\x0b\x0c]|[A-Z]|"
                    + _SGML + ")", 0),
    ("abbrev1", _ABBREV1, re.I),
    ("abbrev2", _ABBREV4 + r"\.", re.I),
    ("abbrev4", r"(?P<tok>" + _ABBREV4 + r")[ \t]", re.I),
    ("acro", r"(?P<tok>" + _ACRO + r")[ \t\n\r\x0b\x0c]", re.I),
    ("tbspec2", r"(?P<tok>'[0-9][0-9])[ \t\n\r\x0b\x0c]", 0),
    ("word_dot", r"(?P<tok>" + _WORD + r"\.)[,;:]", 0),
    ("phone", r"(?:\([0-9]{3}\) ?|[0-9]{3}[- .])[0-9]{3}[- .][0-9]{4}", 0),
    ("smiley", r"[<>]?[:;=][\-o\*']?[\)\]\(\[dDpP/\\\}\{@\|]", 0),
    ("dblquote_left", r"(?P<tok>\")[A-Za-z0-9$]", 0),
    ("dblquote", r"\"", 0),
    ("plus", r"\+", 0),
    ("percent", r"[%&]", 0),
    ("tilde", r"[~^]", 0),
    ("bar", r"[|\\]", 0),
    ("opbrac", r"[<\[]|&lt;", re.I),
    ("clbrac", r"[>\]]|&gt;", re.I),
    ("lbrace", r"\{", 0),
    ("rbrace", r"\}", 0),
    ("lparen", r"\(", 0),
    ("rparen", r"\)", 0),
    ("hyphens", r"-+", 0),
    ("ldots", r"\.{3,5}|(?:\. ){2,4}\.", 0),
    ("handle", r"@[A-Za-z0-9_]+", 0),
    ("fnmarks", r"@+|#+|_+", 0),
    ("asts", r"\*+|(?:\\\*){1,3}", 0),
    ("insentp", r"[,;:]", 0),
    ("qmarks", r"[?!]+", 0),
    ("period", r"\.", 0),
    ("equals", r"=", 0),
    ("slash", r"/", 0),
    ("dotted", r"[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)+", 0),
    ("hthing_dot", r"(?P<tok>" + _HTHING + r"\.)[,;:]", 0),
    ("hthing", _HTHING, 0),
    ("thing_dot", r"(?P<tok>" + _THING + r"\.)[,;:]", 0),
    ("thing", _THING, 0),
    ("thinga_dot", r"(?P<tok>[A-Z]+(?:(?:[+&]|&[aA][mM][pP];)[A-Z]+)+\.)[,;:]", 0),
    ("thinga", r"[A-Z]+(?:(?:[+&]|&[aA][mM][pP];)[A-Z]+)+", 0),
    ("quote_left", r"(?P<tok>')[A-Za-z][^ \t\n\r]", 0),
    ("redaux2", r"'(?:[msd]|re|ve|ll)", re.I),
    ("quotes", r"''|'|`{1,2}", 0),
]
_COMPILED = [(name, re.compile(pattern, flags)) for name, pattern, flags in _RULES]
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_EXTRA_PERIOD = {"acronym_end", "acronym_sentend", "abbrev1_end"}  # the period is lexed again: "etc. ."
_NEWLINE = re.compile(r"\r\n|[\n\r\x0b\x0c]")


def _normalize(name: str, text: str) -> str:
    if name in ("opbrac", "clbrac", "lbrace", "rbrace", "lparen", "rparen"):
        if text in ("<", ">", "&lt;", "&gt;"):
            return {"&lt;": "<", "&gt;": ">"}.get(text.lower(), text)
        return _BRACKETS[text]
    if name == "smiley":
        return "".join(_BRACKETS.get(c, c) for c in text)
    if name in ("amp", "thinga", "thinga_dot", "tbspec"):
        return re.sub(r"(?i)&amp;", "&", text)
    if name in ("sgml", "frac", "phone"):
        text = text.replace(" ", "\u00a0")
        if name == "phone":
            text = "".join(_BRACKETS.get(c, c) for c in text)
        return text
    if name in ("dblquote_left", "quote_left"):
        return "``" if text == '"' else "`"
    if name == "dblquote":
        return "''"
    if name == "hyphens":
        return "--" if 3 <= len(text) <= 4 else text
    if name == "ldots":
        return "..."
    return text


def _token(match: re.Match) -> str:
    for group in ("tok", "tok2", "tok3"):
        if group in match.re.groupindex and match.group(group) is not None:
            return match.group(group)
    return match.group(0)


def tokenize_lines(text: str) -> list[str]:
    """Tokenized lines of ``text`` (one output line per input line), tokens space-joined.

    The whole text is lexed as one stream (trailing contexts see the next line, as in the
    Java lexer); a line break ends an output line."""
    lines: list[list[str]] = [[]]
    position, end = 0, len(text)
    while position < end:
        newline = _NEWLINE.match(text, position)
        if newline:
            lines.append([])
            position = newline.end()
            continue
        space = _SPACE.match(text, position)
        if space:
            position = space.end()
            continue
        best = None  # (length with trailing context, name, token text)
        for name, pattern in _COMPILED:
            match = pattern.match(text, position)
            if match and match.end() > position and (best is None or match.end() - position > best[0]):
                best = (match.end() - position, name, _token(match))
        if best is None:  # untokenizable: deleted, as the Java lexer does by default
            position += 1
            continue
        _, name, token = best
        lines[-1].append(_normalize(name, token))
        position += len(token) - (1 if name in _EXTRA_PERIOD else 0)
    return [" ".join(t.lower() for t in line) for line in lines]
