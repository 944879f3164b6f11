"""`data.source: hf_preference`: preference data as users have it (parquet, Arrow, datasets
save_to_disk folders; `pref_files` finds and streams the rows) -> pre-scored candidate lists.

Layouts (the column names are config keys; defaults in brackets, the first present wins):
  pairs  image [image | images | image_path | img_path], prompt [question | prompt | messages
         | conversations], data.pref_chosen_column [chosen], data.pref_rejected_column
         [rejected] -> the list [chosen, rejected] with rewards [1, 0]
  lists  image, prompt, data.pref_responses_column [responses] (list of texts),
         data.pref_scores_column [scores] (list of numbers, one per response) -> the list as
         given, rewards = the scores
A file with both pair columns is read as pairs. Every other column is ignored.

Cells:
  image   datasets' Image struct {"bytes", "path"} (bytes when present, else the path), raw
          bytes, a path string (absolute, or relative to data.image_dir), or a list holding
          exactly one of these (TRL's `images`). Every image is decoded completely while
          reading, so a truncated or corrupt image is a bad row here, never a crash later.
          RGB JPEG / PNG bytes are stored as they are; anything else as RGB PNG.
  prompt  text, or chat turns: [{"role", "content"}] or LLaVA's [{"from", "value"}], content
          text or parts [{"type": "image"} | {"type": "text", "text": ...}]. The prompt is the
          user turn(s) before the answer: trailing assistant turns are dropped, the user texts
          joined by newlines; a system turn or an earlier assistant turn is a bad row (the
          template is one user turn with its own system prompt).
  chosen / rejected / each response: text, or chat turns (the last assistant turn's text).
Every `<image>` placeholder is taken out of the prompt text (it and the spaces around it
become one space): the processor inserts the one image token itself.

A bad row (undecodable or missing image, empty response, NaN score, wrong type) raises
`DataFileError` naming `file:row N` (N counts from 0, as `Dataset[N]` does), or with
`skip_invalid=True` is skipped, logged and returned in `skipped` (`refcoco_style.Skipped`,
its `line` is the row). A missing column is a `ConfigError` naming the file, its columns and
the key to set. Grounding / OCR rewards never apply: the rewards are the file's.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
from typing import Any, Iterator

import numpy as np
from PIL import Image

from perpo_jax.config import ConfigError
from perpo_jax.data import pref_files
from perpo_jax.data.local_builder import LocalFilesConfig, prepared_files
from perpo_jax.data.refcoco_builders import CandidateLists
from perpo_jax.data.refcoco_style import DataFileError, Skipped

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "images", "image_path", "img_path")
PROMPT_COLUMNS = ("question", "prompt", "messages", "conversations")
IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "system": "system"}
_KEPT_FORMATS = ("JPEG", "PNG")


@dataclasses.dataclass(frozen=True)
class PreferenceColumns:
    """Column names (`data.pref_*_column`); image / prompt None = the first present of
    `IMAGE_COLUMNS` / `PROMPT_COLUMNS`."""

    image: str | None = None
    prompt: str | None = None
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    scores: str = "scores"


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """How one file's rows are read: kind "pairs" (answers = chosen, rejected columns) or
    "lists" (answers = responses, scores columns)."""

    kind: str
    image: str
    prompt: str
    answers: tuple[str, str]

    @property
    def columns(self) -> list[str]:
        return [self.image, self.prompt, *self.answers]


@dataclasses.dataclass(frozen=True)
class PreferenceList:
    """One row as a candidate list. image: encoded RGB (JPEG / PNG) bytes, decoded once to
    check them; answer: the best candidate; scores [N] float32 (pairs: [1, 0])."""

    image: bytes
    image_path: str
    question: str
    answer: str
    candidates: tuple[str, ...]
    scores: np.ndarray
    path: str
    row: int


# ----------------------------------------------------------------------------- columns


def _pick(names: list[str], given: str | None, defaults: tuple[str, ...], key: str,
          path: str) -> str:
    if given is not None:
        if given not in names:
            raise ConfigError(f"{key}: {path} has no column {given!r} (its columns: "
                              f"{', '.join(names)})")
        return given
    for name in defaults:
        if name in names:
            return name
    raise ConfigError(f"{key}: {path} has none of the columns {', '.join(defaults)} (its "
                      f"columns: {', '.join(names)}); set {key} to the column to read")


def file_layout(path: str, names: list[str], columns: PreferenceColumns) -> FileLayout:
    """The layout of a file with columns `names`; a `ConfigError` naming the key to set."""
    image = _pick(names, columns.image, IMAGE_COLUMNS, "data.pref_image_column", path)
    prompt = _pick(names, columns.prompt, PROMPT_COLUMNS, "data.pref_prompt_column", path)
    if columns.chosen in names and columns.rejected in names:
        return FileLayout("pairs", image, prompt, (columns.chosen, columns.rejected))
    if columns.responses in names and columns.scores in names:
        return FileLayout("lists", image, prompt, (columns.responses, columns.scores))
    raise ConfigError(
        f"data.pref_chosen_column: {path} has neither the pair columns {columns.chosen!r} + "
        f"{columns.rejected!r} (data.pref_chosen_column / data.pref_rejected_column) nor the "
        f"list columns {columns.responses!r} + {columns.scores!r} (data.pref_responses_column "
        f"/ data.pref_scores_column); its columns: {', '.join(names)}")


# ----------------------------------------------------------------------------- cells


def _image_file(path: str, image_root: str | None) -> str:
    if not os.path.isabs(path):
        if image_root is None:
            raise DataFileError(f"image path {path!r} is relative: set data.image_dir to the "
                                "folder it is relative to")
        path = os.path.join(image_root, path)
    if not os.path.isfile(path):
        raise DataFileError(f"image {path} not found")
    return os.path.abspath(path)


def checked_image(data: bytes) -> bytes:
    """`data` decoded completely; returned as is when RGB JPEG / PNG, else as RGB PNG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: a truncated file fails here
            if im.mode == "RGB" and im.format in _KEPT_FORMATS:
                return data
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except Image.UnidentifiedImageError:
        raise DataFileError(f"image cannot be decoded: {len(data)} bytes in no image format "
                            "PIL reads") from None
    except Exception as e:  # PIL raises many types for hostile bytes; all mean "bad image"
        raise DataFileError(f"image cannot be decoded ({type(e).__name__}: {e})") from None


def image_cell(value: Any, column: str, image_root: str | None) -> tuple[bytes, str]:
    """(checked image bytes, its path or "") of an image cell (see module docstring)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataFileError(f"{column!r} holds {len(value)} images; one image per row is "
                                "supported")
        value = value[0]
    data, path = None, ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or ""
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        path = value
    elif value is not None:
        raise DataFileError(f"{column!r} has type {type(value).__name__}; expected image "
                            "bytes, a {bytes, path} struct or a path")
    if data is None:
        if not path:
            raise DataFileError(f"{column!r} has no image (neither bytes nor a path)")
        path = _image_file(path, image_root)
        with open(path, "rb") as f:
            data = f.read()
    return checked_image(data), path


def without_placeholders(text: str) -> str:
    """`text` without `<image>` placeholders (each, with its surrounding spaces, one space)."""
    return _PLACEHOLDER_RE.sub(" ", text).strip()


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataFileError(f"{where} content has type {type(content).__name__}; expected "
                            "text or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            continue  # the row's image column holds the image
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataFileError(f"{where} part {j} is not {{'type': 'image'}} or {{'type': "
                                f"'text', 'text': str}}: {part!r:.80}")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_turns(messages: list, column: str) -> list[tuple[str, str]]:
    """[(role, text)] of chat turns ({role, content} or {from, value}); role one of user /
    assistant / system (human -> user, gpt -> assistant)."""
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise DataFileError(f"{column!r}[{i}] has type {type(turn).__name__}; expected a "
                                "{role, content} turn")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise DataFileError(f"{column!r}[{i}] has role {role!r}; expected one of "
                                f"{', '.join(_ROLES)}")
        turns.append((_ROLES[role.lower()], _content_text(content, f"{column!r}[{i}]")))
    return turns


def prompt_cell(value: Any, column: str) -> str:
    """The question text of a prompt cell (see module docstring), placeholders removed."""
    if isinstance(value, str):
        return without_placeholders(value)
    if not isinstance(value, list):
        raise DataFileError(f"{column!r} has type {type(value).__name__}; expected text or "
                            "chat turns")
    turns = chat_turns(value, column)
    while turns and turns[-1][0] == "assistant":
        turns.pop()  # the answer (LLaVA-style conversations end with it)
    if not turns:
        raise DataFileError(f"{column!r} has no user turn")
    other = next((role for role, _ in turns if role != "user"), None)
    if other is not None:
        raise DataFileError(f"{column!r} has a {other} turn before the answer; only user "
                            "turns can make the prompt (the template has one user turn)")
    return without_placeholders("\n".join(text for _, text in turns))


def response_cell(value: Any, column: str) -> str:
    """The response text of a chosen / rejected / responses[i] cell."""
    if isinstance(value, list):
        answers = [text for role, text in chat_turns(value, column) if role == "assistant"]
        if not answers:
            raise DataFileError(f"{column!r} has no assistant turn")
        value = answers[-1]
    elif not isinstance(value, str):
        raise DataFileError(f"{column!r} has type {type(value).__name__}; expected text or "
                            "chat turns")
    if not value.strip():
        raise DataFileError(f"{column!r} is empty")
    return value


def scores_cell(value: Any, column: str, count: int) -> np.ndarray:
    """[count] float32 finite scores."""
    if not isinstance(value, list):
        raise DataFileError(f"{column!r} has type {type(value).__name__}; expected a list of "
                            "numbers")
    if len(value) != count:
        raise DataFileError(f"{column!r} has {len(value)} scores for {count} responses")
    for i, s in enumerate(value):
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise DataFileError(f"{column!r}[{i}] is {s!r}; scores must be finite numbers")
    scores = np.asarray(value, np.float32)
    if not np.isfinite(scores).all():
        raise DataFileError(f"{column!r} has a score beyond float32's range")
    return scores


# ----------------------------------------------------------------------------- rows


def row_list(values: dict, layout: FileLayout, image_root: str | None, path: str,
             row: int) -> PreferenceList:
    """One row -> `PreferenceList`; `DataFileError` (without file:row) when it is bad. The
    texts are checked first, the image (slowest) last."""
    question = prompt_cell(values[layout.prompt], layout.prompt)
    first, second = layout.answers
    if layout.kind == "pairs":
        candidates = (response_cell(values[first], first), response_cell(values[second], second))
        scores = np.asarray([1.0, 0.0], np.float32)
    else:
        responses = values[first]
        if not isinstance(responses, list) or not responses:
            raise DataFileError(f"{first!r} must be a non-empty list of responses, got "
                                f"{type(responses).__name__}")
        candidates = tuple(response_cell(v, f"{first}[{i}]") for i, v in enumerate(responses))
        scores = scores_cell(values[second], second, len(candidates))
    image, image_path = image_cell(values[layout.image], layout.image, image_root)
    return PreferenceList(image=image, image_path=image_path, question=question,
                          answer=candidates[int(np.argmax(scores))], candidates=candidates,
                          scores=scores, path=path, row=row)


def _rows(layouts: list[tuple[str, FileLayout]], image_root: str | None, skip_invalid: bool,
          skipped: list) -> Iterator[PreferenceList]:
    kept = 0
    for path, layout in layouts:
        for row, values in pref_files.iter_rows(path, layout.columns):
            try:
                record = row_list(values, layout, image_root, path, row)
            except DataFileError as e:
                if not skip_invalid:
                    raise DataFileError(f"{path}:row {row}: {e}") from None
                log.warning("skipping %s:row %d: %s", path, row, e)
                skipped.append(Skipped(path, row, str(e)))
                continue
            kept += 1
            yield record
    if not kept:
        raise DataFileError(f"no usable row in {', '.join(p for p, _ in layouts)} "
                            f"({len(skipped)} skipped as invalid)")


def read_preference_lists(files: list[str], columns: PreferenceColumns,
                          image_root: str | None, *, skip_invalid: bool = False,
                          skipped: list | None = None) -> Iterator[PreferenceList]:
    """The rows of `files` as `PreferenceList`s, streamed. Every file's columns are checked
    now (before any row is read); bad rows raise or, with `skip_invalid`, go to `skipped`."""
    layouts = []
    for path in files:
        names = pref_files.file_schema(path).names
        layouts.append((path, file_layout(path, names, columns)))
    return _rows(layouts, image_root, skip_invalid, [] if skipped is None else skipped)


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass
class PreferenceFilesConfig(LocalFilesConfig):
    """files: the data files, in reading order; image_root "" = no data.image_dir."""

    files: tuple[str, ...] = ()
    columns: PreferenceColumns = dataclasses.field(default_factory=PreferenceColumns)


class HfPreferenceLists(CandidateLists):
    """Preference parquet / Arrow rows as candidate lists; pass `config=PreferenceFilesConfig`."""

    DESCRIPTION = "Preference pairs (rewards 1 / 0) or scored response lists from parquet / Arrow."

    def _read_lists(self, skipped: list):
        cfg = self.builder_config
        lists = read_preference_lists(list(cfg.files), cfg.columns, cfg.image_root or None,
                                      skip_invalid=cfg.skip_invalid, skipped=skipped)
        return ({"image": r.image, "image_path": r.image_path, "question": r.question,
                 "answer": r.answer, "candidates": list(r.candidates), "scores": r.scores}
                for r in lists)


def build_hf_preference(data_dir: str, files: list[str], image_root: str | None,
                        columns: PreferenceColumns, *, name: str = "default",
                        skip_invalid: bool = False):
    """Prepare (or reuse) `hf_preference_lists/<name>` -> (builder, list[Skipped])."""
    if not files:
        raise ValueError("build_hf_preference needs at least one data file")
    config = PreferenceFilesConfig(name=name, annotations=files[0], image_root=image_root or "",
                                   skip_invalid=skip_invalid, files=tuple(files), columns=columns)
    return prepared_files(HfPreferenceLists, data_dir, config)
