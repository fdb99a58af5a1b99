"""Load data sets from local files or the hub, check every record, and normalise them to TRL's formats.

Local files are read by hand (JSON lines, JSON arrays, optionally gzipped) so that a malformed line is
reported with its file and line number; parquet files and hub data sets go through `datasets`.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from rlhf.errors import DataError
from rlhf.pipeline.config import DataSource
from rlhf.pipeline.registry import fingerprint_files, hash_config

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Records:
    """Rows of one data set, with a way to name each row in an error."""

    rows: list[dict]
    origin: str  # the file or hub id, for messages
    fingerprint: str  # changes when the data changes
    labels: list[str] | None = None  # per-row location ("line 7"); None: "record i"

    def where(self, index: int) -> str:
        label = self.labels[index] if self.labels else f"record {index + 1}"
        return f"{self.origin} {label}"


def is_local(path: str) -> bool:
    return path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def load_records(source: DataSource) -> Records:
    """Read every row of `source`; errors name the file and line."""
    if is_local(source.path):
        return _load_local(Path(source.path).expanduser())
    return _load_hub(source)


def _load_local(path: Path) -> Records:
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix == ".parquet":
        try:
            rows = datasets.Dataset.from_parquet(str(path)).to_list()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{path}: cannot be read as a parquet file ({err})") from None
        return Records(rows=rows, origin=str(path), fingerprint=fingerprint_files([path]))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    rows, labels = _parse_json_text(text, path)
    return Records(rows=rows, origin=str(path), fingerprint=fingerprint_files([path]), labels=labels)


def _parse_json_text(text: str, path: Path) -> tuple[list[dict], list[str]]:
    stripped = text.lstrip()
    # A .jsonl file is JSON lines even when its first record is a list (then it is reported as not an object).
    if stripped.startswith("[") and not path.name.endswith((".jsonl", ".jsonl.gz")):  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
        labels = [f"record {i + 1}" for i in range(len(rows))]
    else:  # JSON lines
        rows, labels = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: malformed JSON ({err.msg} at column {err.colno})") from None
            labels.append(f"line {number}")
    for row, label in zip(rows, labels):
        if not isinstance(row, dict):
            raise DataError(f"{path} {label}: each record must be a JSON object, got {type(row).__name__}")
    return rows, labels


def _load_hub(source: DataSource) -> Records:
    try:
        dataset = datasets.load_dataset(source.path, name=source.name, data_dir=source.data_dir,
                                        split=source.split, revision=source.revision)
    except Exception as err:  # the hub client raises many types; the user needs the message, not the type
        raise DataError(f"could not load hub data set '{source.path}' (split {source.split}): {err}") from None
    identity = {"path": source.path, "name": source.name, "data_dir": source.data_dir,
                "split": source.split, "revision": source.revision, "fingerprint": dataset._fingerprint}
    return Records(rows=dataset.to_list(), origin=f"hub data set {source.path}", fingerprint=hash_config(identity))


# ---- checks shared by every format -----------------------------------------------------------------


def require_string(records: Records, index: int, row: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise DataError(f"{records.where(index)}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{records.where(index)}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{records.where(index)}: field '{name}' is empty")
    return value


def require_messages(records: Records, index: int, row: dict, name: str) -> list[dict]:
    value = row.get(name)
    if not isinstance(value, list) or not value:
        raise DataError(f"{records.where(index)}: field '{name}' must be a non-empty list of messages")
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{records.where(index)}: field '{name}' message {turn + 1} must be "
                            f"{{'role': one of {', '.join(ROLES)}, 'content': a string}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def require_nonempty(records: Records) -> None:
    if not records.rows:
        raise DataError(f"{records.origin}: the data set is empty")


# ---- SFT demonstrations ------------------------------------------------------------------------------


def sft_rows(records: Records) -> list[dict]:
    """Demonstrations as TRL prompt/completion rows (standard or conversational).

    Accepted: {prompt, completion} strings; {prompt, completion} message lists; {messages}, whose last
    turn (an assistant message) becomes the completion, so the loss falls on the final answer only.
    """
    require_nonempty(records)
    out = []
    kind = None
    for i, row in enumerate(records.rows):
        this_kind, normalised = _sft_row(records, i, row)
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            raise DataError(f"{records.where(i)}: is {this_kind} but earlier records are {kind}; "
                            f"use one format per data set")
        out.append(normalised)
    return out


def _sft_row(records: Records, i: int, row: dict) -> tuple[str, dict]:
    if "messages" in row:
        messages = require_messages(records, i, row, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{records.where(i)}: field 'messages' must end with an assistant message "
                            f"that follows at least one other message")
        return "conversational", {"prompt": messages[:-1], "completion": messages[-1:]}
    if "prompt" not in row and "completion" not in row:
        raise DataError(f"{records.where(i)}: missing field 'prompt' (expected prompt/completion or messages; "
                        f"found fields: {', '.join(sorted(row)) or 'none'})")
    if isinstance(row.get("prompt"), list):
        return "conversational", {"prompt": require_messages(records, i, row, "prompt"),
                                  "completion": require_messages(records, i, row, "completion")}
    return "standard", {"prompt": require_string(records, i, row, "prompt"),
                        "completion": require_string(records, i, row, "completion")}


# ---- PPO prompts ----------------------------------------------------------------------------------


def prompt_rows(records: Records) -> list[dict]:
    """PPO prompts as {prompt: text or message list}; other fields (a completion, a pair) are ignored,
    so an SFT or comparison file can serve as a prompt set."""
    require_nonempty(records)
    out = []
    for i, row in enumerate(records.rows):
        if isinstance(row.get("prompt"), list):
            out.append({"prompt": require_messages(records, i, row, "prompt")})
        else:
            out.append({"prompt": require_string(records, i, row, "prompt")})
    kinds = {isinstance(r["prompt"], list) for r in out}
    if len(kinds) > 1:
        conversational = isinstance(out[0]["prompt"], list)
        first = next(i for i, r in enumerate(out) if isinstance(r["prompt"], list) != conversational)
        raise DataError(f"{records.where(first)}: mixes message-list and text prompts; use one format per data set")
    return out


def split_train_eval(rows: list[dict], *, eval_rows: list[dict] | None, eval_fraction: float,
                     seed: int, origin: str) -> tuple[list[dict], list[dict]]:
    """Use the given eval rows, or carve `eval_fraction` of `rows` off with `seed`."""
    if eval_rows is not None:
        return rows, eval_rows
    if len(rows) < 2:
        raise DataError(f"{origin}: needs at least 2 records to hold one out for evaluation, has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def all_texts(rows: list[dict]) -> list[str]:
    """Every string inside `rows` (values of nested lists and mappings too), for tokenizer training."""
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(rows)
    return texts


def to_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


# ---- ranked comparisons for the reward model ---------------------------------------------------------

HH_ASSISTANT = "\n\nAssistant:"  # turn markers of Anthropic HH-RLHF's full texts
HH_HUMAN = "\n\nHuman:"


class InvalidPair(DataError):
    """A well-formed record whose pair ranks nothing: identical, no shared prompt, an empty response, ..."""


@dataclass
class ComparisonSet:
    """Pairs ready for the reward model, and why each skipped record was skipped."""

    rows: list[dict]  # {"prompt", "chosen", "rejected"} strings or message lists, plus "margin" (float) if given
    skip_reasons: list[str] = field(default_factory=list)  # one message per skipped record; empty unless skip_invalid

    @property
    def skipped(self) -> int:
        return len(self.skip_reasons)


def comparison_rows(records: Records) -> list[dict]:
    """Pairs as explicit-prompt rows: {"prompt", "chosen", "rejected"} plus "margin" (float) when the data has it.

    Accepted, one format per data set: explicit {prompt, chosen, rejected} as strings or message lists, and
    implicit {chosen, rejected} full texts (as HH-RLHF ships them) or full conversations, whose shared start
    becomes the prompt. Any bad pair raises; `comparison_set(records, skip_invalid=True)` skips unusable ones.
    """
    return comparison_set(records).rows


def comparison_set(records: Records, *, skip_invalid: bool = False) -> ComparisonSet:
    """`comparison_rows`, and with skip_invalid, skip the pairs that rank nothing (identical, no shared prompt,
    an empty response, chosen and rejected that part before the assistant's answer) instead of raising, noting
    why. Malformed records (a missing field, a wrong type, a bad margin, mixed formats) always raise."""
    require_nonempty(records)
    rows: list[dict] = []
    reasons: list[str] = []
    kind = None
    with_margin = None
    for i, row in enumerate(records.rows):
        this_kind = _comparison_kind(records, i, row)
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            raise DataError(f"{records.where(i)}: is {this_kind} but earlier records are {kind}; "
                            f"use one format per data set")
        margin = _margin(records, i, row)
        if with_margin is None:
            with_margin = margin is not None
        elif with_margin != (margin is not None):
            which = "has no field 'margin' but earlier records do" if with_margin else \
                "has field 'margin' but earlier records do not"
            raise DataError(f"{records.where(i)}: {which}; give every record a margin or none")
        try:
            pair = _comparison_row(records, i, row, kind)
        except InvalidPair as err:
            if not skip_invalid:
                raise
            reasons.append(str(err))
            continue
        if margin is not None:
            pair["margin"] = margin
        rows.append(pair)
    if not rows:
        raise DataError(f"{records.origin}: no usable pairs: all {len(reasons)} records were skipped, "
                        f"the first because {reasons[0]}")
    return ComparisonSet(rows=rows, skip_reasons=reasons)


def _comparison_kind(records: Records, i: int, row: dict) -> str:
    explicit = "prompt" in row
    for name in ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected"):
        if name not in row:
            raise DataError(f"{records.where(i)}: missing field '{name}' (expected chosen and rejected, with "
                            f"or without prompt; found fields: {', '.join(sorted(row)) or 'none'})")
        if row[name] is None:
            raise DataError(f"{records.where(i)}: field '{name}' is null; expected a string or a list of messages")
    shape = "conversational" if isinstance(row["prompt" if explicit else "chosen"], list) else "standard"
    return f"{'explicit' if explicit else 'implicit'} {shape}"


def _margin(records: Records, i: int, row: dict) -> float | None:
    value = row.get("margin")
    if value is None:  # absent (hub data sets fill a missing value with None)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{records.where(i)}: field 'margin' must be a finite number, "
                        f"got {type(value).__name__} {value!r:.40}")
    return float(value)


def _comparison_row(records: Records, i: int, row: dict, kind: str) -> dict:
    where = records.where(i)

    def read(name: str) -> str | list[dict]:
        if kind.endswith("conversational"):
            return require_messages(records, i, row, name)
        return require_string(records, i, row, name, allow_empty=True)

    chosen, rejected = read("chosen"), read("rejected")
    if kind.startswith("explicit"):
        prompt = read("prompt")
    else:
        if chosen == rejected:
            raise InvalidPair(f"{where}: chosen and rejected are identical, so the pair ranks nothing")
        cut = _shared_prompt_length(where, chosen, rejected)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        _check_response(where, name, response, prompt_given=kind.startswith("explicit"))
    if chosen == rejected:
        raise InvalidPair(f"{where}: chosen and rejected are identical, so the pair ranks nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, messages, token ids) `a` and `b` share."""
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common


def _shared_prompt_length(where: str, chosen: str | list, rejected: str | list) -> int:
    """Where the prompt ends in an implicit pair: after the shared leading messages of two conversations; in
    two texts, after the last HH_ASSISTANT marker in their common prefix, else after its last whitespace."""
    common = common_prefix_length(chosen, rejected)
    if isinstance(chosen, list):
        if common == 0:
            raise InvalidPair(f"{where}: chosen and rejected share no leading message, so the prompt cannot be "
                              f"extracted; give an explicit 'prompt' field")
        return common
    marker = chosen.rfind(HH_ASSISTANT, 0, common)
    if chosen.rfind(HH_HUMAN, 0, common) > marker:  # the texts part inside a human turn
        raise InvalidPair(f"{where}: chosen and rejected diverge inside a {HH_HUMAN!r} turn, so they answer "
                          f"different prompts; a pair needs one shared prompt")
    if marker >= 0:
        return marker + len(HH_ASSISTANT)
    cut = common
    while cut > 0 and not chosen[cut - 1].isspace():  # never split a word
        cut -= 1
    if not chosen[:cut].strip():
        raise InvalidPair(f"{where}: chosen and rejected share no common prefix, so the prompt cannot be "
                          f"extracted; give an explicit 'prompt' field")
    return cut


def _check_response(where: str, name: str, response: str | list, *, prompt_given: bool) -> None:
    after = "" if prompt_given else " once the shared prompt is removed"
    if isinstance(response, str):
        if not response.strip():
            raise InvalidPair(f"{where}: field '{name}' is an empty response{after}")
        return
    if not any(m["content"].strip() for m in response):
        raise InvalidPair(f"{where}: field '{name}' is an empty response{after}")
    if response[0]["role"] != "assistant":  # later turns may be anything: some answers run on past a turn
        raise InvalidPair(f"{where}: field '{name}' must start with an assistant message{after}, got a "
                          f"{response[0]['role']} message: chosen and rejected must answer the same prompt")
