"""Stage folders: each stage reads one folder and writes the next, never half-written, never over another's."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.errors import MapbuildError
from runtime.manifest import FORMAT, MANIFEST
from runtime.member import PACKED, MemberSpec, described

from .models import FAMILIES, HUB_ID, Source
from .versions import versions

META = "mapbuild.json"
ADAPTER, FULL = "adapter", "model"  # a run folder keeps a LoRA adapter, or the fully fine-tuned weights (--lora-r 0)
BUNDLE, REPORT = "bundle", "report"  # package's and analyze's folders, marked by their own files rather than META
_PENDING: set[Path] = set()  # temporary folders being written, for the signal handler
# How a full disk (or quota) reads: OSError's errno, or the text of writers that do not raise OSError: torch.save
# ("PytorchStreamWriter failed writing file ...: file write failed", "unexpected pos") and safetensors ("os error 28").
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("file write failed", "PytorchStreamWriter failed", "unexpected pos", *map(os.strerror, _FULL), *(f"os error {n}" for n in _FULL))


def remove_pending() -> None:
    """Remove every temporary folder still being written. For signal handlers: an exception raised there can land
    in a `__del__` and be swallowed, so they cannot rely on unwinding."""
    for tmp in list(_PENDING):
        shutil.rmtree(tmp, ignore_errors=True)


STAGES = ("run", "merged", "onnx")
# What each stage must record beyond the fields every folder has; a transformer's onnx folder also names `merged`.
NEEDS = {"run": ("base_model", "template", "max_length", "pad_token_id", "hardware"), "merged": ("run",), "onnx": ("run", "precision", "drift", "params", "mean_tokens")}


@dataclass(kw_only=True)
class StageMeta(MemberSpec):
    """What a stage folder says of itself in its mapbuild.json: the one record that train, merge, export, knn and
    tfidf write, each stage starting from the one before (dataclasses.replace), and package hands on to the bundle's
    member (its MemberSpec fields). Checked when written and when read."""

    stage: str = field(metadata={"help": "the stage that wrote the folder: run, merged or onnx"})
    model_type: str = field(metadata={"help": "the family's model_type (llama, bert, ...), or knn / tfidf"})
    label_space: dict = field(metadata={"help": "LabelSpace.to_json() of the rows the member was fitted on"})
    config: dict = field(metadata={"help": "the training config (TrainConfig, KnnConfig or TfidfConfig) as asdict"})
    metrics: dict = field(metadata={"help": "the validation figures, as the run's metrics.json holds them"})
    provenance: dict | None = described("versions, the data file's sha256 and rows used, the git commit (provenance())")
    gguf_file: str | None = described("the GGUF file inside base_model, where the weights came as GGUF")
    hardware: dict | None = described("where the run trained: device, precision, dtype, world size")
    run: str | None = described("the folder that holds the member's oof.npz and metrics.json")
    merged: str | None = described("the merged folder an onnx folder was exported from")
    read: dict | None = described("what the stages so far read, to know it again: role (base_model, run, merged) -> "
                                  "{'path', 'files': sha256 by file}; the next stage refuses an input that changed since")
    files: dict | None = described(f"sha256 of every file the stage wrote, by path in the folder ({META}: of this record "
                                   "but this field); written by atomic_dir, checked by read_meta")

    def __post_init__(self) -> None:
        if problem := self.problem():
            raise ValueError(f"{META}: {problem}")

    def problem(self) -> str | None:
        """The first way this record breaks what the stages reading it rely on, or None."""
        if problem := super().problem():
            return problem
        if self.stage not in STAGES:
            return f"stage {self.stage!r} is not one of {', '.join(STAGES)}"
        transformer = self.kind == "transformer"
        if transformer and self.model_type not in FAMILIES:
            return f"model_type {self.model_type!r} is not a family this mapbuild knows ({', '.join(sorted(FAMILIES))})"
        if not transformer and self.stage != "onnx":
            return f"a {self.kind} member writes its onnx folder directly, not a {self.stage!r} one"
        needs = [k for s in STAGES[: STAGES.index(self.stage) + 1] if transformer or s == "onnx" for k in NEEDS[s]]
        needs += ["merged"] if transformer and self.stage == "onnx" and self.base is None else []  # a member on a base: exported from its run
        if missing := [k for k in needs if getattr(self, k) is None]:
            return f"a {self.kind} {self.stage!r} folder needs {', '.join(missing)}"
        if self.stage == "onnx" and self.cpu_rows_per_s is None and self.cuda_rows_per_s is None:
            return "an onnx folder needs cpu_rows_per_s or cuda_rows_per_s"
        if self.pack_tokens is not None and (self.inputs != PACKED or self.pack_tokens < 1):
            return f"pack_tokens {self.pack_tokens} needs inputs {PACKED!r} and at least 1 token"
        return None


def read_meta(folder: str | os.PathLike, stage: str, fix: str | None = None) -> dict:
    """The metadata of a stage folder as StageMeta.to_json() wrote it, checked to be a whole record of the stage
    `stage` expects as input, over files that are still the ones its stage wrote (`fix`: the advice when they are
    not, writing the folder again by default)."""
    path = Path(folder) / META
    if not path.is_file():
        raise MapbuildError(f"{folder}: not a mapbuild stage folder (no {META})")
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and meta.get("stage") != stage:
            raise MapbuildError(f"{folder}: is a '{meta.get('stage')}' folder, expected '{stage}'")
        StageMeta.from_json(meta)
    except ValueError as e:  # unreadable JSON, or a record StageMeta refuses
        raise MapbuildError(f"{path}: {str(e).removeprefix(f'{META}: ')}; write the folder again with this mapbuild") from None
    # A folder written before custody records has no `files`, and is read unchecked as it was before.
    if problem := changed(meta.get("files") or {}, Path(folder), f"{writer(meta)} wrote it"):
        raise MapbuildError(f"{problem}; {fix or f'write the folder again with `mapbuild {writer(meta)}`'}")
    return meta


def writer(meta: dict) -> str:
    """The command that writes a stage folder."""
    return {"run": "train", "merged": "merge"}.get(meta["stage"], "export" if meta.get("kind", "transformer") == "transformer" else meta["kind"])


def check_read(meta: dict, role: str, now: dict[str, str], names: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming the file, an input `role` (base_model, run) that changed since the stage that read
    it recorded it: `now` is the sha256 of its files as they are, by name; `names` limits the check to the files the
    reader needs. An input no record names (a folder older than custody records) is not checked."""
    recorded = (meta.get("read") or {}).get(role)
    if not recorded:
        return
    folder, by = Path(recorded["path"]), {"base_model": "train", "run": "merge"}[role]
    files = {k: v for k, v in recorded["files"].items() if not names or k in names}
    problem = next((f"{folder / k}: {'changed' if k in now else 'missing'} since {by} read it" for k, v in files.items() if now.get(k) != v), None)
    if problem:
        again = {"base_model": "put back the base the run trained on, or train again", "run": "restore the run, or merge and export it again"}[role]
        raise MapbuildError(f"{problem}; {again}")


def run_file(meta: dict, name: str) -> Path:
    """A file of the run folder a stage record names (oof.npz, metrics.json), refused in one line when it is not the
    one the record's model was trained with (the run trained again since it was merged, say). A missing one is
    left to its reader, which says why it needs it."""
    path = Path(meta["run"]) / name
    if path.is_file():
        check_read(meta, "run", {name: file_sha256(path)}, (name,))
    return path


def check_data(meta: dict, data: str | os.PathLike, fix: str) -> None:
    """Refuse `data` unless it is the file the run trained on, by the sha256 train recorded: another file's folds
    and held-out rows are not the run's (a folder written before provenance records none, and is not checked)."""
    recorded = ((meta.get("provenance") or {}).get("data") or {}).get("sha256")
    if not recorded:
        return
    if not Path(data).is_file():
        raise MapbuildError(f"{data}: missing, and the run's rows are read from it; {fix}")
    if (now := file_sha256(data)) != recorded:
        raise MapbuildError(f"{data}: changed since train read it (sha256 {recorded[:12]}… then, {now[:12]}… now); {fix}")


def git_commit(folder: Path) -> str | None:
    """The commit of the code in `folder`, "+dirty" when its work tree has changes; None outside a git checkout."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "HEAD") + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


_DIGESTS: dict[tuple, str] = {}  # (path, inode, mtime, size) -> sha256: a command hashes a file once, not per read


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, computed again only when the file was replaced or written since."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def folder_files(folder: Path, pattern: str = "**/*") -> dict[str, str]:
    """sha256 of the files under `folder` that match `pattern`, by POSIX path inside it; a stage's own record and
    hidden files (a download's .cache) aside. A hub cache's file is a link to a blob named by its sha256: the name
    is taken for it, as the hub checked it when it downloaded."""
    out = {}
    for p in sorted(folder.glob(pattern)):
        rel = p.relative_to(folder)
        if rel.as_posix() == META or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        blob = p.resolve().name
        out[rel.as_posix()] = blob if p.is_symlink() and re.fullmatch("[0-9a-f]{64}", blob) else file_sha256(p)
    return out


# What transformers reads from a model's folder: the configs, weights, vocabularies and templates at its top level.
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def base_folder(source: Source) -> Path:
    """The folder of a base model: its path, or a hub id's cached snapshot."""
    from huggingface_hub import try_to_load_from_cache

    folder = Path(source.path)
    if not folder.is_dir() and HUB_ID.fullmatch(source.path) and isinstance(found := try_to_load_from_cache(source.path, source.gguf_file or "config.json"), str):
        folder = Path(found).parent
    if not folder.is_dir():
        raise MapbuildError(f"base model {source.path}: not found (no such folder, nor in the Hugging Face cache); put it back where the run trained on it")
    return folder


def base_files(source: Source) -> dict:
    """What train records of its base model, for merge to know it again (check_read): its folder (base_folder) and
    the sha256 of each file there transformers reads (the GGUF file alone, for one)."""
    folder = base_folder(source)
    files = {k: v for pattern in ([source.gguf_file] if source.gguf_file else MODEL_FILES) for k, v in folder_files(folder, pattern).items()}
    return {"path": str(folder), "files": files}


def record_digest(meta: dict) -> str:
    """The sha256 of a stage record as written, but for its `files` (which hold this digest)."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "files"}, sort_keys=True).encode()).hexdigest()


def changed(recorded: dict[str, str], folder: Path, by: str) -> str | None:
    """How `folder` differs from what `by` recorded of it (one file missing or changed, the first found), or None."""
    for rel, sha in recorded.items():
        if rel == META:
            if not (folder / META).is_file() or record_digest(_json(folder / META)) != sha:
                return f"{folder / META}: edited since {by}"
        elif not (folder / rel).is_file():
            return f"{folder / rel}: missing since {by}"
        elif file_sha256(folder / rel) != sha:
            return f"{folder / rel}: changed since {by} (sha256 {sha[:12]}… then, {file_sha256(folder / rel)[:12]}… now)"
    return None


def provenance(data: str | os.PathLike, rows: int) -> dict:
    """What a training stage records to be reproduced and compared: package versions, the data file's sha256 and
    the rows the run used of it (after --sample), and the code's git commit."""
    return {"versions": versions(), "data": {"path": str(data), "sha256": file_sha256(data), "rows_used": rows}, "git_commit": git_commit(Path(__file__).parent)}


def write_meta(folder: Path, meta: StageMeta) -> None:
    """The folder's record; atomic_dir adds its `files` once the block has written every file."""
    (folder / META).write_text(json.dumps(replace(meta, files=None).to_json(), indent=1, ensure_ascii=False))


def seal(folder: Path) -> None:
    meta = _json(folder / META)
    meta["files"] = {**folder_files(folder), META: record_digest(meta)}
    (folder / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def stage_of(folder: Path) -> str | None:
    """The stage that wrote `folder`, or None for a folder mapbuild did not write."""
    if (folder / META).is_file():
        return _json(folder / META).get("stage")
    if str(_json(folder / MANIFEST).get("format", "")).startswith(FORMAT.rpartition("/")[0] + "/"):  # any bundle version
        return BUNDLE
    if (folder / "report.md").is_file() and (folder / "summary.json").is_file():  # what analyze writes
        return REPORT
    return None


def owned(folder: Path, stage: str) -> set[str] | None:
    """The files a `stage` folder's writer recorded as its own (its record, its manifest), or None where it records
    none (a folder written before it did)."""
    if stage == BUNDLE:
        files = _json(folder / MANIFEST).get("files")
        return None if files is None else {*files, MANIFEST}
    if stage == REPORT:
        files = _json(folder / "summary.json").get("files")
        return None if files is None else {*files, "summary.json"}
    files = _json(folder / META).get("files")
    return None if files is None else {*files, META}


def check_out(out: str | os.PathLike, stage: str | None) -> None:
    """Refuse an --out that writing a `stage` folder would destroy: only a missing or empty folder, or one the same
    stage wrote holding nothing but what it wrote, may be replaced (None: a writer that marks nothing, which
    replaces nothing). A symlink is checked, and replaced, as the folder it points to."""
    out = Path(os.path.realpath(out))
    if not out.exists():
        return
    if not out.is_dir():
        raise MapbuildError(f"--out {out}: is a file, not a folder; choose another --out")
    found, held = stage_of(out), sorted(p.name for p in out.iterdir())
    by = f"a '{stage}' folder" if stage else "a new one"
    if not held:
        return
    if found is not None and found == stage:
        own = owned(out, found)
        theirs = [] if own is None else sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir() and p.relative_to(out).as_posix() not in own and "__pycache__" not in p.parts)
        if not theirs:
            return
        raise MapbuildError(f"--out {out}: holds {', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}, which the '{found}' folder's writer did not write and writing {by} there would delete; move it away or choose another --out")
    what = f"a '{found}' folder" if found else f"files mapbuild did not write ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
    raise MapbuildError(f"--out {out}: holds {what}, which writing {by} there would delete; choose another --out")


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _existing(path: Path) -> Path:
    return next((p for p in (path, *path.resolve().parents) if p.exists()), Path("/"))


def disk_full(e: BaseException, folder: Path | None, written: int = 0) -> MapbuildError | None:
    """The one line for an error that means the disk (or quota) is full, naming the folder being written (or the
    failing file's folder when that lies on another disk) and what is free; None for any other error. `written`:
    bytes the write took before it failed (and since removed), a floor on what it needs."""
    chain, seen = [], e
    while seen is not None and len(chain) < 8:  # a wrapper's cause (onnx, accelerate) may hold the OSError
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = lambda x: x.errno in _FULL if isinstance(x, OSError) else any(t in str(x) for t in _FULL_TEXT)
    hit = next((x for x in chain if full(x)), None)
    if hit is None:
        return None
    name = getattr(hit, "filename", None)
    if name and (folder is None or os.stat(_existing(Path(name))).st_dev != os.stat(_existing(folder)).st_dev):
        folder, written = Path(name).parent, 0
    if folder is None:
        return MapbuildError("no space left on the disk; free some space and run again")
    need = f", over {_bytes(written)} needed" if written else ""
    return MapbuildError(f"{folder}: no space left on the disk ({_bytes(shutil.disk_usage(_existing(folder)).free)} free{need}); free some space or choose another --out")


@contextmanager
def atomic_dir(out: str | os.PathLike, stage: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; it replaces `out` only when the block succeeds, and only where `out` is
    missing, empty or a `stage` folder (check_out: checked before the block and again before replacing). `stage`
    defaults to the one the block's folder turns out to be (stage_of). A stage folder's record gets the sha256 of
    every file written (`files`). A symlinked `out` is replaced where it points, the link left as it was. A full disk
    is a one-line MapbuildError."""
    out = Path(os.path.realpath(out))
    if stage is not None:
        check_out(out, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    _PENDING.add(tmp)
    try:
        yield tmp
        if (tmp / META).is_file():
            seal(tmp)
        check_out(out, stage or stage_of(tmp))  # `out` may have appeared while the block ran
    except BaseException as e:
        written = size_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := disk_full(e, out, written)) is not None:
            raise full from None
        raise
    finally:
        _PENDING.discard(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
