"""``car batch``'s engine: the local commands' tasks, run by a pool of Ray actors (Ray Data).

The driver lists the inputs (a local folder or any URI pyarrow reads: ``s3://``,
``gs://``, ``hdfs://``, ``file://``), plans the outputs exactly as the local
commands do (:func:`carcli.batch.make_items`: name clashes and outputs that
are inputs fail up front; finished outputs are skipped unless ``--overwrite``)
and hands the rest to Ray Data: ``from_items(...).map_batches(_Worker, ...)``
with a pool of actors (one GPU per actor when the cluster has GPUs, else
``threads`` CPU threads). Inside an actor a batch of files goes through the
same :func:`carcli.batch.run_batch` as on one machine (decode ahead and encode
behind the networks in background threads, atomic writes, one error per bad
file), so the results are the same bytes. An actor holds the command's model;
for ``upscale`` it picks one per file from the file's carcli note as ``car
upscale`` does (:func:`carcli.checkpoints.upscaler_for`: the scale, and the
generic upscaler for files ``car downscale`` did not make), loads each the
first time a file needs it, and runs each model's files as their own batch.

Ray retries a batch whose actor died (a node lost, an out-of-memory kill) on a
restarted actor. Outputs that the lost attempt already finished are recomputed
for the report but not written again: an output is written only if it did not
exist when the job started, or, with ``--overwrite``, if it is older than the
job (so each output is written exactly once, given clocks that agree).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from carcli.batch import (
    Item,
    NullReporter,
    Outcome,
    Reporter,
    Task,
    make_items,
    run_batch,
    summarize,
)
from carcli.engine import Processor
from carcli.errors import CarError, UsageError
from carcli.formats import made_by_car, read_note
from carcli.imageio import decode_image, is_image_path
from carcli.report import ModelInfo
from carcli.tasks import DownscaleTask, RoundtripTask, UpscaleTask

INSTALL_HINT = "Ray is not installed: pip install 'carcli[ray]' (or pip install 'ray[data]')"
ACTIONS = ("downscale", "upscale", "roundtrip")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """Whether ``location`` names a filesystem by scheme (``s3://...``) rather than a path."""
    return bool(_URI.match(location))


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`UsageError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra, not only ray core)
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


# --------------------------------------------------------------------------- storage


class Store:
    """Files under a local folder or a pyarrow filesystem URI (listing, bytes, uploads)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.remote = bool(_URI.match(location))
        self.fs: Any = None
        if self.remote:
            from pyarrow import fs as pafs

            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except Exception as exc:  # pyarrow's errors for unknown schemes, credentials
                raise UsageError(f"cannot open {location}: {_first_line(exc)}") from None
        else:
            self.root = location

    def is_dir(self) -> bool:
        if not self.remote:
            return Path(self.root).is_dir()
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def exists(self, path: str) -> bool:
        if not self.remote:
            return Path(path).exists()
        from pyarrow import fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def mtime(self, path: str) -> float | None:
        """Modification time (seconds since the epoch), None if missing."""
        if not self.remote:
            with contextlib.suppress(OSError):
                return Path(path).stat().st_mtime
            return None
        info = self.fs.get_file_info(path)
        return info.mtime.timestamp() if info.mtime is not None else None

    def list_images(self, recursive: bool) -> list[tuple[Path, Path]]:
        """(file, path relative to the root) of every image, in a stable order."""
        if not self.remote:
            from carcli.paths import collect_inputs

            return collect_inputs(Path(self.root), recursive)
        from pyarrow import fs as pafs

        if not self.is_dir():
            if not self.exists(self.root):
                raise UsageError(f"{self.location}: no such file or folder")
            return [(Path(self.root), Path(Path(self.root).name))]
        selector = pafs.FileSelector(self.root, recursive=recursive)
        found = []
        for info in self.fs.get_file_info(selector):
            rel = Path(info.path).relative_to(self.root)
            hidden = any(part.startswith(".") for part in rel.parts)
            if info.type == pafs.FileType.File and is_image_path(rel) and not hidden:
                found.append((Path(info.path), rel))
        return sorted(found, key=lambda pair: pair[1].as_posix())

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def upload(self, local: Path, dest: str) -> None:
        """Copy a finished local file to ``dest`` via a temp name, so no partial file shows."""
        parent = dest.rsplit("/", 1)[0]
        if parent:
            self.fs.create_dir(parent, recursive=True)
        temp = f"{parent}/.{dest.rsplit('/', 1)[-1]}.carcli-upload-{os.getpid()}"
        with self.fs.open_output_stream(temp) as out:
            out.write(local.read_bytes())
        self.fs.move(temp, dest)


# --------------------------------------------------------------------------- the job


@dataclass
class JobSpec:
    """Everything an actor needs to rebuild the command's processor and task (picklable)."""

    action: str
    source: str  # local folder/file or URI
    output: str | None  # local folder/file or URI (roundtrip: optional)
    scale: int | None = 4  # upscale: None picks each file's scale from its note, else 4
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    tile: int | None = None
    threads: int | None = None
    refine: int = 0
    refine_range: int = 4
    fmt: str = "png"
    quality: int = 95
    suffix: str = ""  # added to output names (--suffix)
    out_file: str | None = None  # downscale/upscale of one file to a named file
    compare: bool = False
    overwrite: bool = False
    started: float = 0.0  # job start (time.time()); outputs newer than this are the job's own
    hooks: dict[str, Any] = field(default_factory=dict)  # tests: write_log, crash_after, marker

    def task(self, processor: Processor | None) -> Task:
        """The local command's task (``processor`` None: for planning on the driver)."""
        out = _task_path(self.output)
        if self.action == "roundtrip":
            return RoundtripTask(
                processor,  # type: ignore[arg-type]
                out,
                compare=self.compare,
                overwrite=self.overwrite,
                suffix=self.suffix,
            )
        cls = DownscaleTask if self.action == "downscale" else UpscaleTask
        out_file = _task_path(self.out_file)
        out_dir = None if out_file is not None else out
        return cls(
            processor,  # type: ignore[arg-type]
            out_dir,
            out_file,
            self.fmt,
            self.quality,
            self.overwrite,
            suffix=self.suffix,
        )


def _task_path(location: str | None) -> Path | None:
    """A Path the tasks can join names to: the local path, or the URI's filesystem path."""
    if location is None:
        return None
    return Path(Store(location).root) if _URI.match(location) else Path(location)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Collector(NullReporter):
    """A silent :class:`Reporter` for run_batch inside an actor: keeps notes and warnings."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.warnings: dict[str, list[str]] = {}

    def warn(self, rel: str, message: str) -> None:
        self.warnings.setdefault(rel, []).append(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


class _ActorTask(Task):
    """The command's task with the actor's storage and write-once rule around it.

    An upscale actor holds one task per model; :meth:`use` picks the one that the
    next call of run_batch runs (its files all need that model).
    """

    skip_done = False  # the driver skipped finished items when it planned the job

    def __init__(self, spec: JobSpec) -> None:
        planned = spec.task(None)
        super().__init__(planned.processor, planned.overwrite)
        self.inner, self.spec = planned, spec
        self.action, self.label = planned.action, planned.label
        self.source = Store(spec.source)
        target = spec.out_file or spec.output
        self.target = Store(target) if target else None
        self.writes = 0
        self.fetched: dict[str, bytes] = {}  # remote files read for their note, not yet loaded

    def use(self, inner: Task) -> _ActorTask:
        """Run the next items with ``inner``: the command's task on the model they need."""
        self.inner, self.processor = inner, inner.processor
        return self

    def note(self, item: Item) -> dict[str, str]:
        """The file's carcli note; a remote file is fetched once, for this and :meth:`load`."""
        if not self.source.remote:
            return read_note(item.src)
        try:
            data = self.source.read(str(item.src))
        except Exception:  # pyarrow's errors; load reads it again and reports the failure
            return {}
        self.fetched[str(item.src)] = data
        return read_note(data)

    def load(self, item: Item):  # noqa: ANN201
        if self.source.remote:
            data = self.fetched.pop(str(item.src), None)
            return decode_image(data if data is not None else self.source.read(str(item.src)))
        return self.inner.load(item)

    def batch_key(self, item: Item, picture: Any) -> Any:
        return self.inner.batch_key(item, picture)

    def compute(self, item: Item, picture: Any) -> Any:
        return self.inner.compute(item, picture)

    def compute_many(self, items: Sequence[Item], pictures: Sequence[Any]) -> list:
        return self.inner.compute_many(items, pictures)

    def finish(self, item: Item, result: Any) -> Any:
        return self.inner.finish(item, result)

    def _to_write(self, path: Path) -> bool:
        assert self.target is not None
        mtime = self.target.mtime(str(path))
        if mtime is None:
            return True
        # Existing: someone else's (kept unless --overwrite), or this job's own from an
        # attempt whose actor died before it could report (never written twice).
        return self.spec.overwrite and mtime < self.spec.started

    def save(self, item: Item, result: Any) -> None:
        if self.target is None or not item.outputs:
            return
        todo = {role: p for role, p in item.outputs.items() if self._to_write(p)}
        if not todo:
            return
        if not self.target.remote:
            self.inner.save(replace(item, outputs=todo), result)
            self._wrote(todo.values())
            return
        with tempfile.TemporaryDirectory(prefix="carcli-") as staging:
            local = {role: Path(staging) / role / p.name for role, p in todo.items()}
            self.inner.save(replace(item, outputs=local), result)
            for role, path in todo.items():
                self.target.upload(local[role], str(path))
        self._wrote(todo.values())

    def _wrote(self, paths: Any) -> None:
        """Test hooks: log each write; die (once per job) after the N-th."""
        hooks = self.spec.hooks
        for path in paths:
            self.writes += 1
            if hooks.get("write_log"):
                with open(hooks["write_log"], "a") as log:
                    log.write(f"{os.getpid()} {path}\n")
        crash_after, marker = hooks.get("crash_after"), hooks.get("crash_marker")
        if crash_after and marker and self.writes >= crash_after:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)  # as a killed process: no cleanup, no reply to the driver


def build_processor(
    spec: JobSpec, scale: int, generic: Path | None = None
) -> tuple[Processor, ModelInfo]:
    """One of the job's models on this actor's device, run as the local commands run it.

    ``generic``: the generic upscaler to load instead of the pair (see
    :func:`carcli.checkpoints.load_for_run`); also the report's entry for the model.
    """
    from carcli.checkpoints import load_for_run
    from carcli.engine import build_processor as local_processor
    from carcli.runpolicy import RunPolicy, resolve_device

    device = resolve_device(spec.device)
    # On a CPU the actor's share of the node is its --threads CPUs (Ray reserved them).
    threads: int | str = spec.threads or (1 if device.type == "cpu" else "auto")
    policy = RunPolicy(device, spec.precision, spec.tile, threads)
    weights = Path(spec.weights) if spec.weights else None
    upscale_only = spec.action == "upscale"
    model, info = load_for_run(weights, scale, device, generic, upscale_only)
    processor = local_processor(model, policy, spec.refine, spec.refine_range)
    if spec.action == "roundtrip" and spec.tile is not None:  # HR pixels, as `car roundtrip`
        processor.down_tile = max(1, spec.tile // processor.scale)
    return processor, info


ModelKey = tuple[int, Path | None]  # (scale, generic upscaler or None for the pair)


class _Worker:
    """One Ray actor: runs batches of items through run_batch, each on the model it needs.

    A model is loaded the first time a file needs it (downscale and roundtrip have
    one; an upscale actor that only sees 4x files made by ``car downscale`` loads
    only the 4x pair) and kept; one that cannot load fails its files with one line
    each, as a bad input does, instead of killing the actor.
    :func:`_worker_class` binds the job to a subclass, so the job travels with the
    class rather than as a constructor argument in the object store (which Ray
    warns may be gone when it restarts a lost actor).
    """

    SPEC: JobSpec

    def __init__(self) -> None:
        spec = self.SPEC
        self.task = _ActorTask(spec)
        self.weights = Path(spec.weights) if spec.weights else None
        self.models: dict[ModelKey, tuple[Task, dict[str, Any]] | str] = {}
        self.found: dict[int, Path | None] = {}  # find_generic's answers by scale
        self.engine: dict[str, str] | None = None

    def _load(self, key: ModelKey) -> tuple[Task, dict[str, Any]]:
        """The command's task on one model, and the model's entry for the report."""
        processor, info = build_processor(self.SPEC, *key)
        self.engine = {"device": str(processor.device), "precision": processor.precision}
        model = {"role": info.role, "scale": info.scale, "files": [str(p) for p in info.files]}
        return self.SPEC.task(processor), model

    def _model(self, key: ModelKey) -> tuple[Task, dict[str, Any]] | str:
        """The loaded model for ``key``, or why it cannot load (each file needing it fails)."""
        if key not in self.models:
            try:
                self.models[key] = self._load(key)
            except CarError as exc:
                self.models[key] = str(exc)
        return self.models[key]

    def _key(self, item: Item) -> tuple[ModelKey, bool]:
        """The model ``item`` needs, and whether it lacks a carcli note (for the warning)."""
        spec = self.SPEC
        if spec.action != "upscale":
            assert spec.scale is not None
            return (spec.scale, None), False
        from carcli.checkpoints import upscaler_for

        note = self.task.note(item)
        return upscaler_for(note, spec.scale, self.weights, self.found), not made_by_car(note)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        items = [
            Item(src=Path(src), rel=rel, outputs={k: Path(v) for k, v in json.loads(out).items()})
            for src, rel, out in zip(batch["src"], batch["rel"], batch["outputs"], strict=True)
        ]
        collector = _Collector()
        groups: dict[ModelKey, list[int]] = {}
        foreign: dict[int, ModelKey] = {}
        try:
            for i, item in enumerate(items):
                key, lacks_note = self._key(item)
                groups.setdefault(key, []).append(i)
                if lacks_note:
                    foreign[i] = key
            outcomes: dict[int, Outcome] = {}
            models: dict[int, dict[str, Any]] = {}  # the report entry of each file's model
            for key, members in groups.items():
                model = self._model(key)
                group = [items[i] for i in members]
                if isinstance(model, str):  # it could not load: each of its files fails
                    done = [Outcome(item, "failed", model) for item in group]
                else:
                    task, entry = model
                    done = run_batch(self.task.use(task), group, collector)
                    models.update(dict.fromkeys(members, entry))
                outcomes.update(zip(members, done, strict=True))
        finally:
            self.task.fetched.clear()
        rows: dict[str, list] = {k: [] for k in ("index", "status", "error", "record", "extra")}
        for i, index in enumerate(batch["index"]):
            outcome, key = outcomes[i], foreign.get(i)
            extra = {
                "pixels": outcome.pixels,
                "seconds": outcome.seconds,
                "notes": collector.notes if i == 0 else [],
                "warnings": collector.warnings.get(outcome.item.rel, []),
                "engine": self.engine if i == 0 else None,
                "model": models.get(i),
                "foreign": None if key is None else [key[0], key[1] and str(key[1])],
            }
            rows["index"].append(int(index))
            rows["status"].append(outcome.status)
            rows["error"].append(outcome.error or "")
            rows["record"].append(json.dumps(outcome.record))
            rows["extra"].append(json.dumps(extra))
        return rows


def _worker_class(spec: JobSpec) -> type[_Worker]:
    return type("CarWorker", (_Worker,), {"SPEC": spec, "__module__": __name__})


# --------------------------------------------------------------------------- the driver


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (None: $RAY_ADDRESS or a new local instance)."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address not in (None, "", "auto-or-local"):
            kwargs["address"] = address
        try:
            ray.init(logging_level="ERROR", **kwargs)
        except ConnectionError as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return ray


def cluster_workers(ray: Any, threads: int | None) -> tuple[int, bool]:
    """(actors to start, whether each gets a GPU): one per GPU, else one per ``threads`` CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(resources.get("CPU", 1)) // (threads or 1)), False


def plan(spec: JobSpec, recursive: bool) -> tuple[list[Item], set[int]]:
    """(every item in input order, indices of those already finished): the local rules."""
    inputs = Store(spec.source).list_images(recursive)
    if not inputs:
        hint = "" if recursive else "; add --recursive to look in subfolders"
        raise UsageError(f"no images found in {spec.source}{hint}")
    task = spec.task(None)
    items = make_items(task, inputs)
    target_loc = spec.out_file or spec.output
    target = Store(target_loc) if target_loc else None
    done = set()
    for index, item in enumerate(items):
        finished = (
            task.skip_done
            and not spec.overwrite
            and not item.error
            and item.outputs
            and target is not None
            and all(target.exists(str(p)) for p in item.outputs.values())
        )
        if finished:
            done.add(index)
    return items, done


@dataclass
class Engine:
    """What ran the job, as the actors report it (for the ``--json`` report and warnings)."""

    device: str = "none"
    precision: str = "none"
    # Every model that ran, in the order of the first input each one ran (as `car upscale`).
    models: list[ModelInfo] = field(default_factory=list)
    # The model (scale, generic upscaler or None) of each file without a carcli note.
    foreign: list[tuple[int, Path | None]] = field(default_factory=list)
    images: int = 0  # files the actors were given


def run_on_ray(
    spec: JobSpec,
    reporter: Reporter,
    recursive: bool = False,
    address: str | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    engine: Engine | None = None,
) -> list[Outcome]:
    """Run the job on the cluster; outcomes in input order, as :func:`run_batch` returns them.

    ``engine`` is filled in with the device, precision and models the actors used.
    """
    ray = connect(address)
    start = time.perf_counter()
    spec = replace(spec, started=time.time())
    items, done = plan(spec, recursive)
    todo = [i for i in range(len(items)) if i not in done]
    count, gpu = cluster_workers(ray, spec.threads)
    count = max(1, min(workers or count, len(todo) or 1))
    reporter.start(len(items), spec.task(None).label)
    outcomes: dict[int, Outcome] = {}
    for index in sorted(done):
        outcomes[index] = Outcome(items[index], "skipped")
        reporter.advance(outcomes[index])
    try:
        if todo:
            jobs = {i: items[i] for i in todo}
            runs = _execute(ray, spec, jobs, count, gpu, batch_size, reporter, engine or Engine())
            for outcome, index in runs:
                outcomes[index] = outcome
    finally:
        ordered = [outcomes[i] for i in sorted(outcomes)]
        reporter.finish(summarize(spec.task(None).action, ordered, time.perf_counter() - start))
    return ordered


def _execute(
    ray: Any,
    spec: JobSpec,
    todo: dict[int, Item],
    count: int,
    gpu: bool,
    batch_size: int,
    reporter: Reporter,
    engine: Engine,
) -> Any:
    """Yield (outcome, input index) as the actors finish them; ``todo``: index -> item."""
    import logging

    from ray.data import ActorPoolStrategy, DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our reporter says what happens
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    rows = [
        {
            "index": i,
            "src": str(item.src),
            "rel": item.rel,
            "outputs": json.dumps({k: str(v) for k, v in item.outputs.items()}),
        }
        for i, item in todo.items()
        if not item.error
    ]
    for i, item in todo.items():  # known failures (name clashes) need no actor
        if item.error:
            outcome = Outcome(item, "failed", item.error)
            reporter.error(item.rel, item.error)
            reporter.advance(outcome)
            yield outcome, i
    if not rows:
        return
    resources: dict[str, Any] = {"num_gpus": 1} if gpu else {"num_cpus": spec.threads or 1}
    # Every actor gets work: blocks of at most batch_size rows, at least one per actor.
    count = min(count, len(rows))
    batch_size = min(batch_size, -(-len(rows) // count))
    dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // batch_size))
    results = dataset.map_batches(
        _worker_class(spec),
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=count),
        **resources,
    )
    first: dict[str, tuple[int, ModelInfo]] = {}  # each model's first input index
    for row in results.iter_rows():
        index = int(row["index"])
        item, extra = todo[index], json.loads(row["extra"])
        engine.images += 1
        outcome = Outcome(
            item,
            str(row["status"]),
            str(row["error"]) or None,
            record=json.loads(row["record"]),
            pixels=int(extra["pixels"]),
            seconds=float(extra["seconds"]),
        )
        if extra["engine"]:
            engine.device, engine.precision = (
                extra["engine"]["device"],
                extra["engine"]["precision"],
            )
        if extra["model"]:
            _add_model(first, index, extra["model"])
            engine.models = [info for _, info in sorted(first.values(), key=lambda f: f[0])]
        if extra["foreign"]:
            scale, generic = extra["foreign"]
            engine.foreign.append((int(scale), Path(generic) if generic else None))
        for message in extra["notes"]:
            reporter.note(message)
        for message in extra["warnings"]:
            reporter.warn(item.rel, message)
        if outcome.status == "failed":
            reporter.error(item.rel, outcome.error or "failed")
        reporter.advance(outcome)
        yield outcome, index


def _add_model(first: dict[str, tuple[int, ModelInfo]], index: int, model: dict) -> None:
    """Note that input ``index`` ran on ``model`` (an actor's report entry)."""
    key = json.dumps(model, sort_keys=True)
    if key not in first or index < first[key][0]:
        files = [Path(p) for p in model["files"]]
        first[key] = (index, ModelInfo(int(model["scale"]), files, str(model["role"])))
