"""The outcome mapping file: coded values and words to ``positive`` / ``negative`` / ``not_assessable``.

Every route (CSV, HL7 v2, FHIR) hands each finding it reads to :meth:`Mapping.classify` as a :class:`Finding`:
the codings it carries (coding system and code) and its words. Semantics, in this order:

1. **Codes first.** A coding matches a ``codes`` rule when its system is one of the rule's system aliases
   (``systems`` section; compared case-insensitively) and its code is the rule's code (exactly, after trimming).
   Every coding of the finding is tried; when the matching rules disagree the finding is *conflicting* (not
   mapped), otherwise their label is the finding's.
2. **Then words, first match in file order.** The finding's text, lower case with runs of white space as one
   space, is tried against each ``words`` rule in turn: ``equals`` matches the whole text, ``phrase`` matches
   the phrase as whole words anywhere in it. The first rule that matches decides, so negations (``not
   detected``, ``no evidence of``) must come before the words they negate (``detected``).
3. Nothing matched: the finding is *unmapped*; the caller counts it by reason and never guesses.

A bad file is refused in one line naming the file and the entry (:func:`load_mapping`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping as AnyMapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from cxr_node.jobs.records import OUTCOME_LABELS, OutcomeLabel

MAX_RULES: Final = 10_000
"""Most rules a mapping file may hold (codes and words together)."""

MAX_TEXT: Final = 4096
"""Only the first characters of a finding's text are matched against the words."""


@dataclass(frozen=True)
class Coding:
    """One coded value as it arrived: its coding system (an HL7 table name, a URI or an OID) and its code."""

    system: str
    code: str


@dataclass(frozen=True)
class Finding:
    """What one route read for one finding: its codings and its words (either may be empty)."""

    codings: tuple[Coding, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Match:
    """A finding mapped: its label and what decided it (``system|code``, or ``words:<the rule's words>``)."""

    label: OutcomeLabel
    code: str


@dataclass(frozen=True)
class Unmapped:
    """A finding that could not be mapped, and why (a short reason, counted by the routes)."""

    reason: str


@dataclass(frozen=True)
class CodeRule:
    """``system`` (a name of the ``systems`` section) and ``code`` mean ``label``."""

    system: str
    code: str
    label: OutcomeLabel


@dataclass(frozen=True)
class WordRule:
    """The text equal to (``whole``) or containing as whole words (not ``whole``) ``words`` means ``label``."""

    words: str
    whole: bool
    label: OutcomeLabel

    def matches(self, text: str) -> bool:
        """True when ``text`` (already normalised) is, or contains as whole words, this rule's words."""
        if self.whole:
            return text == self.words
        return re.search(rf"(?<![a-z0-9]){re.escape(self.words)}(?![a-z0-9])", text) is not None


@dataclass(frozen=True)
class Mapping:
    """A loaded mapping file: system aliases, code rules and word rules (in file order).

    Parameters
    ----------
    path : Path
        Where it was read from (named in messages).
    aliases : Mapping[str, str]
        Each alias of a coding system, lower case, to the system's name in the file.
    codes : Mapping[tuple[str, str], OutcomeLabel]
        (system name, code) to label.
    words : tuple[WordRule, ...]
        The word rules, first match wins.
    """

    path: Path
    aliases: AnyMapping[str, str]
    codes: AnyMapping[tuple[str, str], OutcomeLabel]
    words: tuple[WordRule, ...]

    def classify(self, finding: Finding) -> Match | Unmapped:
        """Map ``finding``: codes first, then words (first match); see the module's docstring."""
        by_code = self._by_code(finding.codings)
        if by_code is not None:
            return by_code
        text = normalise(finding.text)
        for rule in self.words:
            if rule.matches(text):
                return Match(rule.label, f"words:{rule.words}")
        if not text and not finding.codings:
            return Unmapped("empty value")
        return Unmapped("code not in the mapping" if finding.codings else "not in the mapping")

    def _by_code(self, codings: Sequence[Coding]) -> Match | Unmapped | None:
        found: dict[OutcomeLabel, str] = {}
        for coding in codings:
            system = self.aliases.get(coding.system.strip().lower())
            label = self.codes.get((system, coding.code.strip())) if system else None
            if label is not None:
                found.setdefault(label, f"{coding.system.strip()}|{coding.code.strip()}")
        if len(found) > 1:
            return Unmapped("conflicting codes")
        return next((Match(label, code) for label, code in found.items()), None)


def normalise(text: str) -> str:
    """``text`` for word matching: lower case, underscores as spaces, runs of white space as one space."""
    return " ".join(text[:MAX_TEXT].lower().replace("_", " ").split())


SHIPPED: Final = Path(__file__).with_name("default-mapping.yaml")
"""The mapping shipped with cxr-node (``outcomes.mapping`` unset): copy it to edit it for a site."""


def load_mapping(path: Path | None = None) -> Mapping:
    """Read and check a mapping file (the shipped :data:`SHIPPED` when ``path`` is None).

    Raises
    ------
    ValueError
        In one line naming the file and the entry: unreadable, not YAML, an unknown section or key, a rule
        without its system, code, words or label, an unknown label or system, a code listed twice.
    """
    path = SHIPPED if path is None else path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the outcome mapping: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: the outcome mapping is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the outcome mapping must be a mapping with systems, codes and words")
    unknown = sorted(set(data) - {"version", "systems", "codes", "words"})
    if unknown:
        raise ValueError(f"{path}: unknown section {unknown[0]!r} (expected: version, systems, codes, words)")
    aliases = _systems(path, data.get("systems") or {})
    codes = _codes(path, data.get("codes") or [], set(aliases.values()))
    words = _words(path, data.get("words") or [])
    if len(codes) + len(words) > MAX_RULES:
        raise ValueError(f"{path}: more than {MAX_RULES} rules")
    if not codes and not words:
        raise ValueError(f"{path}: the outcome mapping has no rule (codes or words)")
    return Mapping(path, aliases, codes, words)


def _systems(path: Path, section: Any) -> dict[str, str]:
    if not isinstance(section, dict):
        raise ValueError(f"{path}: systems must map each system's name to a list of its aliases")
    aliases: dict[str, str] = {}
    for name, names in section.items():
        if not isinstance(names, list) or not all(isinstance(n, str | int) and str(n).strip() for n in names):
            raise ValueError(f"{path}: systems.{name}: expected a list of aliases (names, URIs, OIDs)")
        for alias in [str(name), *map(str, names)]:
            key = alias.strip().lower()
            if aliases.get(key, str(name)) != str(name):
                raise ValueError(f"{path}: systems.{name}: alias {alias!r} also names system {aliases[key]!r}")
            aliases[key] = str(name)
    return aliases


def _codes(path: Path, section: Any, systems: set[str]) -> dict[tuple[str, str], OutcomeLabel]:
    if not isinstance(section, list):
        raise ValueError(f"{path}: codes must be a list of {{system, code, label}} entries")
    codes: dict[tuple[str, str], OutcomeLabel] = {}
    for number, entry in enumerate(section, start=1):
        where = f"{path}: codes entry {number}"
        rule = _entry(where, entry, {"system", "code", "label"}, {"display"})
        if isinstance(rule["code"], bool) or not isinstance(rule["code"], str | int):
            raise ValueError(f"{where}: code must be text, found {rule['code']!r} (quote it in YAML)")
        system, code = str(rule["system"]).strip(), str(rule["code"]).strip()
        if system not in systems:
            raise ValueError(f"{where}: system {system!r} is not in the systems section ({', '.join(sorted(systems))})")
        if not code:
            raise ValueError(f"{where}: empty code")
        if (system, code) in codes:
            raise ValueError(f"{where}: code {system}|{code} is listed twice")
        codes[(system, code)] = _label(where, rule["label"])
    return codes


def _words(path: Path, section: Any) -> tuple[WordRule, ...]:
    if not isinstance(section, list):
        raise ValueError(f"{path}: words must be a list of {{phrase or equals, label}} entries")
    rules: list[WordRule] = []
    for number, entry in enumerate(section, start=1):
        where = f"{path}: words entry {number}"
        rule = _entry(where, entry, {"label"}, {"phrase", "equals"})
        if ("phrase" in rule) == ("equals" in rule):
            raise ValueError(f"{where}: give exactly one of phrase (whole words inside the text) or equals")
        value = rule.get("phrase", rule.get("equals"))
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"{where}: words must be text, found {value!r} (quote yes/no/true/false in YAML)")
        words = normalise(str(value))
        if not words:
            raise ValueError(f"{where}: empty words")
        rules.append(WordRule(words, "equals" in rule, _label(where, rule["label"])))
    return tuple(rules)


def _entry(where: str, entry: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, found {entry!r}")
    missing = sorted(required - set(entry))
    extra = sorted(set(entry) - required - optional)
    if missing or extra:
        problem = f"missing {missing[0]!r}" if missing else f"unknown key {extra[0]!r}"
        raise ValueError(f"{where}: {problem} (found {entry!r})")
    if any(entry[key] is None for key in required):
        raise ValueError(f"{where}: empty value (found {entry!r})")
    return entry


def _label(where: str, value: Any) -> OutcomeLabel:
    for label in OUTCOME_LABELS:
        if value == label:
            return label
    raise ValueError(f"{where}: label must be one of {', '.join(OUTCOME_LABELS)}, found {value!r}")
