"""Finding, saving and loading CAR weights.

Two formats are understood:

* carcli's own: one ``.safetensors`` file per scale holding both networks
  (``resampler.*`` and ``sr.*``) plus JSON metadata (config, recipe, metrics),
  so a file is self-describing and loading it never unpickles anything;
* the authors' release: a folder with ``kgn.pth`` (resampler) and ``usn.pth``
  (EDSR), DataParallel state_dicts for the paper configuration, optionally
  split into ``2x/`` and ``4x/`` subfolders.

Every failure a user can cause raises :class:`WeightsError` with a one-line
message, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from carcli.bundled import weights_path
from carcli.defaults import SCALES
from carcli.errors import NoWeightsInstalled, WeightsError, WeightsWriteError, param
from carcli.formats import made_by_car, note_scale
from carcli.models.car import CARModel
from carcli.models.config import CARConfig, check_scale, preset
from carcli.report import ModelInfo

FORMAT = "carcli-car/1"
ENV_VAR = "CARCLI_WEIGHTS"
OFFICIAL_FILES = ("kgn.pth", "usn.pth")
# Metadata keys save_checkpoint writes itself; user metadata may repeat them only unchanged.
RESERVED_KEYS = ("format", "config", "scale")
# The resampler's kernel head: its output channels are k*k with k = 3s + 1.
KERNEL_HEAD = "kernels_weight.4.weight"
TAPS_TO_SCALE = {(3 * s + 1) ** 2: s for s in SCALES}
# How many key names an error message lists before summarising with a count.
SHOW = 5


def shipped_name(scale: int) -> str:
    """File name of carcli's own weights for ``scale`` inside the weights folder."""
    return f"car_x{scale}.safetensors"


# A generic upscaler: an SR network trained on plain bicubic LR images, for inputs that
# `car downscale` did not make. It lives next to the pair weights as car_generic_x{s}, in the
# carcli-car/1 format with metadata "role": "generic-sr" and only the sr.* tensors: it has no
# trained resampler, so it is written without one (half the file) and loads as upscale-only.
GENERIC_ROLE = "generic-sr"


def generic_name(scale: int) -> str:
    """File name of the generic (SR-only) upscaler for ``scale`` next to the pair weights."""
    return f"car_generic_x{scale}.safetensors"


def find_generic(weights: Path | None, scale: int) -> Path | None:
    """The generic upscaler beside the pair weights (``--weights``' folder, else the installed
    weights folder), or None when there is none; ``--weights`` itself when it is one."""
    if weights is None:
        folder = weights_dir()
    else:
        weights = Path(weights).expanduser()
        if weights.is_file():
            with contextlib.suppress(WeightsError):  # a bad file is reported when it loads
                if read_metadata(weights).get("role") == GENERIC_ROLE:
                    return weights
        folder = weights if weights.is_dir() else weights.parent
    path = folder / generic_name(scale)
    return path if path.is_file() else None


def upscaler_for(
    note: Mapping[str, str],
    scale: int | None,
    weights: Path | None,
    found: dict[int, Path | None] | None = None,
) -> tuple[int, Path | None]:
    """(scale, generic upscaler or None for the pair) that upscales a file with this note.

    The rule `car upscale` and `car batch upscale` share: the scale is ``scale`` when
    given, else the one the note records, else 4; a file that `car downscale` did not
    make goes to the generic upscaler when one is installed, because the pair's SR
    network only understands its own resampler's images. ``found`` keeps one run's
    :func:`find_generic` answers by scale, so a folder of photos costs one lookup.
    """
    s = note_scale(note, scale)
    if made_by_car(note):
        return s, None
    found = {} if found is None else found
    if s not in found:
        found[s] = find_generic(weights, s)
    return s, found[s]


def load_generic(path: Path, scale: int, device: str | torch.device = "cpu") -> CARModel:
    """The generic upscaler at ``path``; WeightsError unless its metadata marks it as one."""
    model, meta = _load_checked_scale(Path(path), scale, device)
    if meta.get("role") != GENERIC_ROLE:
        raise WeightsError(
            f"{path} is named like a generic upscaler but its metadata lacks "
            f'"role": "{GENERIC_ROLE}"; remove or rename it'
        )
    return model


def weights_files(weights: Path | None, scale: int, meta: dict[str, Any]) -> list[Path]:
    """The files :func:`load_model` read for these arguments (for reports and their SHA-256)."""
    if meta.get("source") == "official":
        folder = Path(meta.get("path", weights or "."))
        with contextlib.suppress(WeightsError):
            folder = _official_folder(folder, scale)
        return [folder / name for name in OFFICIAL_FILES]
    if weights is None:
        return [weights_dir() / shipped_name(scale)]
    path = Path(weights).expanduser()
    return [path if path.is_file() else path / shipped_name(scale)]


def weights_dir() -> Path:
    """Where shipped weights live: ``$CARCLI_WEIGHTS``, else the package's ``carcli/weights/``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return weights_path()


# ----------------------------------------------------------------------------- helpers


def _names(keys: Iterable[str], noun: str) -> str:
    """Count and first few names: readable even when hundreds of keys differ."""
    keys = list(keys)
    plural = (
        noun if len(keys) == 1 else noun.replace("key", "keys").replace("mismatch", "mismatches")
    )
    shown = ", ".join(keys[:SHOW])
    more = f", ... {len(keys) - SHOW} more" if len(keys) > SHOW else ""
    return f"{len(keys)} {plural} ({shown}{more})"


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one readable WeightsError for missing/unexpected keys and shape mismatches.

    ``load_state_dict`` would raise too, but with a multi-line RuntimeError that
    lists every key; users need the gist and the first offenders.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {_shape(state[k].shape)}, model {_shape(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(_names(missing, "missing key"))
    if unexpected:
        problems.append(_names(unexpected, "unexpected key"))
    if mismatched:
        problems.append(_names(mismatched, "shape mismatch"))
    if problems:
        raise WeightsError(f"{what} does not match carcli's network: " + "; ".join(problems))


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    _check_state(module, state, what)
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity: they turn every image black or into noise."""
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise WeightsError(
            f"{what} holds NaN or infinite values in {_names(bad, 'tensor key')}; "
            "the weights are damaged (a diverged training run?)"
        )


def _skeleton(config: CARConfig) -> CARModel:
    """The network a config describes, on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return CARModel(config)


def _json_default(value: Any) -> Any:
    """Encode the usual non-JSON values a training script puts in metadata."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if callable(getattr(value, "tolist", None)):  # tensors, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable")


def _decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """JSON-decode every value; ``format`` and values from foreign writers stay strings."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested too deep: kept as text
            out[key] = value
    return out


# ----------------------------------------------------------------------------- carcli format


# Storage types a checkpoint may use; weights are always computed in float32 after loading.
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def save_checkpoint(
    model: CARModel, path: Path, metadata: dict | None = None, storage: str = "fp32"
) -> None:
    """Write both networks and their config to one safetensors file, atomically.

    Atomic (temp file + ``os.replace``) so an interrupted save never leaves a
    truncated file where ``car`` would look for weights. ``storage`` fp16 halves the
    file (every shipped file stays in the repository's history); loading casts back.
    """
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    dtype = STORAGE_DTYPES[storage]
    path = Path(path)
    if path.exists() and not path.is_file():  # os.replace would swap out a device or FIFO
        raise WeightsError(f"{path}: exists and is not a regular file; not replaced")
    config = model.config.to_dict()
    header = {"format": FORMAT, "config": json.dumps(config), "scale": str(model.config.scale)}
    ours = {"format": FORMAT, "config": config, "scale": model.config.scale}
    for key, value in (metadata or {}).items():
        key = str(key)
        if key in RESERVED_KEYS:
            if json.loads(json.dumps(value, default=_json_default)) != ours[key]:
                raise ValueError(f"metadata[{key!r}] conflicts with the model's own {key}")
            continue
        header[key] = json.dumps(value, default=_json_default)

    tensors: dict[str, torch.Tensor] = {}
    sr_only = (metadata or {}).get("role") == GENERIC_ROLE or model.sr_only
    if sr_only and header.get("role") is None:
        header["role"] = json.dumps(GENERIC_ROLE)
    parts = (("sr", model.sr),) if sr_only else (("resampler", model.resampler), ("sr", model.sr))
    for prefix, net in parts:
        for key, tensor in net.state_dict().items():
            tensor = tensor.detach().to("cpu", torch.float32)
            stored = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(tensor).all()):
                raise WeightsError(f"{prefix}.{key} does not fit in {storage}; store it as fp32")
            tensors[f"{prefix}.{key}"] = stored.contiguous()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        from carcli.imageio import blocked_parent

        blocker = blocked_parent(path)
        reason = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
        raise WeightsWriteError(f"cannot write {path}: {reason}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is not
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the cleanup must not hide the reason
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WeightsWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        if isinstance(exc, Exception) and "No space left" in str(exc):  # safetensors' own error
            raise WeightsWriteError(f"cannot write {path}: No space left on device") from None
        raise


def file_digest(path: Path) -> str:
    """SHA-256 of a file, so a checkpoint made from others records exactly which ones."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validated carcli metadata and (if asked) all tensors of a safetensors file."""
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata() or {}
            names = handle.keys() if tensors else []  # safe_open is not iterable
            data = {k: handle.get_tensor(k) for k in names}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path} is not a safetensors file ({_first_line(exc)})") from exc
    meta = _decode_metadata(raw)
    fmt = meta.get("format")
    if fmt is None:
        raise WeightsError(f"{path} is a safetensors file without carcli metadata (no format)")
    if fmt != FORMAT:
        raise WeightsError(f"{path} has format {fmt!r}; this carcli reads {FORMAT!r}")
    return meta, data


def config_from_metadata(meta: Mapping[str, Any], path: Path) -> CARConfig:
    """The network a checkpoint's metadata describes; WeightsError naming ``path`` if unreadable."""
    data = meta.get("config")
    if not isinstance(data, dict):
        raise WeightsError(f"{path} has no readable model config in its metadata")
    try:
        config = CARConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has an invalid model config ({_first_line(exc)})") from exc
    scale = meta.get("scale")
    if scale is not None and scale != config.scale:
        raise WeightsError(f"{path} says scale {scale} but its config is for {config.scale}x")
    return config


def read_metadata(path: Path) -> dict[str, Any]:
    """Decoded metadata of a carcli checkpoint, without reading its tensors."""
    return _read(Path(path), tensors=False)[0]


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[CARModel, dict]:
    """Rebuild the model a carcli safetensors file describes; returns (model in eval, metadata)."""
    path = Path(path)
    meta, tensors = _read(path, tensors=True)
    config = config_from_metadata(meta, path)
    states: dict[str, dict[str, torch.Tensor]] = {"resampler": {}, "sr": {}}
    stray = []
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in states and rest:
            states[prefix][rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise WeightsError(
            f"{path} has keys outside resampler./sr.: {_names(stray, 'unexpected key')}"
        )
    # A generic upscaler's resampler was never trained: older files carry one, ignored.
    sr_only = meta.get("role") == GENERIC_ROLE
    # Shapes first, on a skeleton: a config claiming a huge network with small tensors
    # is refused here, before the real network allocates anything.
    skeleton = _skeleton(config)
    if not sr_only:
        _check_state(skeleton.resampler, states["resampler"], f"{path} (resampler)")
    _check_state(skeleton.sr, states["sr"], f"{path} (SR network)")
    check_finite(tensors, str(path))
    model = CARModel(config)
    if sr_only:
        model.sr_only = True
    else:
        _load_strict(model.resampler, states["resampler"], f"{path} (resampler)")
    _load_strict(model.sr, states["sr"], f"{path} (SR network)")
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- authors' format


def _unpickling_message(path: Path, exc: Exception) -> str:
    """One line out of torch's multi-paragraph weights_only error.

    torch's text advises loading the file again with ``weights_only=False``,
    which would run whatever code the file holds; none of it is repeated.
    """
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return (
            f"{path} holds a pickled {match.group(1)} object, not plain tensors; refused "
            f"(carcli loads tensors only and never runs code from a file)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = f": {detail.group(1).strip()}" if detail else ""
    return (
        f"{path} is not a plain PyTorch tensor file (its pickle uses something other than "
        f"tensors{reason}); refused"
    )


def load_torch_file(path: Path, what: str = "PyTorch file") -> Any:
    """``torch.load`` with ``weights_only=True``: plain containers and tensors, never code.

    Every failure is a :class:`WeightsError` with one line naming ``path``;
    torch's warnings (pickle protocol) are silenced and its advice to load
    unsafely is never shown.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(_unpickling_message(path, exc)) from None
    except EOFError:
        raise WeightsError(f"cannot read {path}: the file is empty or truncated") from None
    except MemoryError:
        raise WeightsError(f"cannot read {path}: not enough memory") from None
    except Exception as exc:
        reason = _first_line(exc)
        if "weights_only" in reason:  # torch's advice to load unsafely: never repeated
            reason = "not a plain tensor file"
        raise WeightsError(f"cannot read {path} as a {what} ({reason})") from None


def _torch_load_state(path: Path) -> dict[str, torch.Tensor]:
    """A plain tensor state_dict from a ``.pth`` file, ``module.`` prefixes stripped."""
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"{path} is not a plain state_dict (entry {key!r} holds "
                f"{type(value).__name__}, not a tensor)"
            )
        state[key.removeprefix("module.")] = value
    return state


def _resampler_scale(state: Mapping[str, torch.Tensor], path: Path) -> int:
    head = state.get(KERNEL_HEAD)
    if head is None:
        raise WeightsError(f"{path} has no {KERNEL_HEAD}; it is not a CAR resampler (kgn) file")
    taps = int(head.shape[0])
    if taps not in TAPS_TO_SCALE:
        known = ", ".join(f"{t} -> {s}x" for t, s in TAPS_TO_SCALE.items())
        raise WeightsError(f"{path}: kernel head has {taps} outputs; expected one of {known}")
    return TAPS_TO_SCALE[taps]


def _sr_scale(state: Mapping[str, torch.Tensor]) -> int | None:
    """EDSR's scale from its upsampler: one conv + shuffle-2 per factor 2 (None if unclear)."""
    stages = [k for k in state if re.fullmatch(r"tail\.0\.\d+\.weight", k)]
    return 2 ** len(stages) if stages else None


def _holds_official(folder: Path) -> bool:
    """``folder`` holds kgn.pth or usn.pth (the authors' files) itself."""
    return any((folder / name).exists() for name in OFFICIAL_FILES)


def _official_folder(folder: Path, scale: int | None) -> Path:
    """The folder holding kgn.pth/usn.pth: ``folder`` itself or its ``{scale}x/``."""
    if _holds_official(folder):
        return folder
    subs = [s for s in SCALES if (folder / f"{s}x").is_dir()]
    if not subs:
        raise WeightsError(
            f"{folder} holds neither kgn.pth/usn.pth nor 2x/ or 4x/ subfolders with them"
        )
    if scale is None:
        if len(subs) > 1:
            raise WeightsError(f"{folder} has weights for {subs[0]}x and {subs[1]}x; pick a scale")
        return folder / f"{subs[0]}x"
    if scale not in subs:
        have = " and ".join(f"{s}x/" for s in subs)
        raise WeightsError(f"{folder} has no {scale}x/ subfolder (it has {have})")
    return folder / f"{scale}x"


def load_official(
    folder: Path, scale: int | None = None, device: str | torch.device = "cpu"
) -> CARModel:
    """The paper's model with the authors' kgn.pth/usn.pth loaded (eval mode)."""
    folder = Path(folder)
    if not folder.exists():
        raise WeightsError(f"weights folder {folder} does not exist")
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder")
    if scale is not None:
        check_scale(scale)
    where = _official_folder(folder, scale)
    kgn_path, usn_path = (where / name for name in OFFICIAL_FILES)
    for p in (kgn_path, usn_path):
        if not p.is_file():
            raise WeightsError(
                f"{where} has no {p.name} (the authors' folder holds kgn.pth and usn.pth)"
            )
    kgn = _torch_load_state(kgn_path)
    usn = _torch_load_state(usn_path)

    found = _resampler_scale(kgn, kgn_path)
    if scale is not None and found != scale:
        raise WeightsError(f"{kgn_path} is a {found}x resampler, but {scale}x was requested")
    sr_found = _sr_scale(usn)
    if sr_found is not None and sr_found != found:
        raise WeightsError(f"{kgn_path} is for {found}x but {usn_path} is for {sr_found}x")

    skeleton = _skeleton(preset("paper", found))
    _check_state(skeleton.resampler, kgn, f"{kgn_path} (resampler)")
    _check_state(skeleton.sr, usn, f"{usn_path} (SR network)")
    check_finite(kgn, str(kgn_path))
    check_finite(usn, str(usn_path))
    model = CARModel(preset("paper", found))
    _load_strict(model.resampler, kgn, f"{kgn_path} (resampler)")
    _load_strict(model.sr, usn, f"{usn_path} (SR network)")
    return model.to(device).eval()


def _is_official(folder: Path, scale: int) -> bool:
    return _holds_official(folder) or (folder / f"{scale}x").is_dir()


def _official_metadata(model: CARModel, folder: Path) -> dict[str, Any]:
    return {
        "source": "official",
        "config": model.config.to_dict(),
        "scale": model.config.scale,
        "path": str(folder),
    }


# ----------------------------------------------------------------------------- entry points


def load_model(
    weights: Path | None,
    scale: int,
    device: str | torch.device = "cpu",
    upscale_only: bool = False,
) -> tuple[CARModel, dict]:
    """Resolve what the user pointed at (or the shipped weights) to a model in eval mode.

    A generic upscaler (no resampler) is refused unless ``upscale_only``: the caller only
    upscales with it.
    """
    model, meta = _resolve_model(weights, scale, device)
    if model.sr_only and not upscale_only:
        path = weights_files(weights, scale, meta)[0]
        raise WeightsError(
            f"{path} is a generic upscaler (an SR network without a resampler): it can "
            f"upscale but not downscale; use a CAR pair such as {shipped_name(scale)}"
        )
    return model, meta


def load_for_run(
    weights: Path | None,
    scale: int,
    device: str | torch.device = "cpu",
    generic: Path | None = None,
    upscale_only: bool = False,
) -> tuple[CARModel, ModelInfo]:
    """A command's model and the report's entry for it (files read; pair or generic).

    ``generic``: load this generic upscaler (SR only) instead of the pair; ``upscale_only``:
    ``weights`` may be one too. The local commands and `car batch` actors load through
    here, so their reports name the same files.
    """
    if generic is not None:
        return load_generic(generic, scale, device), ModelInfo(scale, [generic], role="generic")
    model, meta = load_model(weights, scale, device, upscale_only=upscale_only)
    role = "generic" if model.sr_only else "pair"
    return model, ModelInfo(scale, weights_files(weights, scale, meta), role=role)


def _resolve_model(
    weights: Path | None, scale: int, device: str | torch.device
) -> tuple[CARModel, dict]:
    check_scale(scale)
    if weights is None:
        folder = weights_dir()
        if os.environ.get(ENV_VAR) and folder.exists() and not folder.is_dir():
            raise WeightsError(
                f"{ENV_VAR}={folder} is a file, but it must name a folder holding "
                f"{shipped_name(2)} and/or {shipped_name(4)}; to use one checkpoint file, "
                f"pass {param('weights')} {folder}"
            )
        path = folder / shipped_name(scale)
        if not path.is_file():
            raise NoWeightsInstalled(
                f"no carcli weights are installed for {scale}x (looked for {path}); "
                f"pass {param('weights')} FILE_OR_FOLDER or set {ENV_VAR}"
            )
        return _load_checked_scale(path, scale, device)

    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if path.is_file():
        if path.name in OFFICIAL_FILES:  # pointed at kgn.pth or usn.pth: use its folder
            model = load_official(path.parent, scale, device)
            return model, _official_metadata(model, path.parent)
        return _load_checked_scale(path, scale, device)
    if _is_official(path, scale):
        model = load_official(path, scale, device)
        return model, _official_metadata(model, path)
    if (path / shipped_name(scale)).is_file():
        return _load_checked_scale(path / shipped_name(scale), scale, device)
    others = [s for s in SCALES if (path / f"{s}x").is_dir() or (path / shipped_name(s)).is_file()]
    hint = f" (it has weights for {others[0]}x only)" if others else ""
    raise WeightsError(
        f"{path} holds neither {shipped_name(scale)} nor the authors' kgn.pth/usn.pth "
        f"(directly or in {scale}x/){hint}"
    )


def _load_checked_scale(
    path: Path, scale: int, device: str | torch.device
) -> tuple[CARModel, dict]:
    model, meta = load_checkpoint(path, device)
    if model.config.scale != scale:
        raise WeightsError(
            f"{path} holds {model.config.scale}x weights, but {scale}x was requested"
        )
    return model, meta


def _checkpoint_entry(path: Path, role: str | None = None) -> dict[str, Any]:
    """One carcli checkpoint for a listing, from its header; problems as ``error``."""
    entry: dict[str, Any] = {"path": path, "role": role or "pair"}
    try:  # the digest identifies the exact file in reports and bug reports
        entry["size"] = path.stat().st_size
        entry["sha256"] = file_digest(path)
    except OSError as exc:
        entry.update(size=None, sha256=None, error=f"cannot read {path}: {exc.strerror or exc}")
    match = re.fullmatch(r"car_(?:generic_)?x(\d+)\.safetensors", path.name)
    scale = int(match.group(1)) if match else None
    try:
        meta = read_metadata(path)
    except WeightsError as exc:
        entry.update(scale=scale, metadata={}, error=entry.get("error") or str(exc))
    else:
        if role is None:  # a file of any name: its metadata says what it is
            entry["role"] = "generic" if meta.get("role") == GENERIC_ROLE else "pair"
        entry.update(scale=meta.get("scale", scale), metadata=meta)
    return entry


def _official_entry(folder: Path) -> dict[str, Any]:
    """The authors' kgn.pth/usn.pth in ``folder`` for a listing (paper config)."""
    kgn_path = folder / OFFICIAL_FILES[0]
    entry: dict[str, Any] = {
        "path": folder, "role": "pair", "sha256": None, "metadata": {"source": "official"},
    }  # fmt: skip
    missing = [name for name in OFFICIAL_FILES if not (folder / name).is_file()]
    if missing:
        return entry | {
            "scale": None,
            "size": None,
            "error": f"{folder} has no {missing[0]} (the authors' folder holds both files)",
        }
    try:
        entry["size"] = sum((folder / n).stat().st_size for n in OFFICIAL_FILES)
        scale = _resampler_scale(_torch_load_state(kgn_path), kgn_path)
    except OSError as exc:
        entry.update(scale=None, size=None, error=f"cannot read {folder}: {exc.strerror or exc}")
    except WeightsError as exc:
        entry.update(scale=None, error=str(exc))
    else:
        entry["metadata"].update(config=preset("paper", scale).to_dict(), scale=scale)
        entry["scale"] = scale
    return entry


def installed_weights(where: Path | None = None) -> list[dict]:
    """The checkpoints in ``where`` (default ``weights_dir()``), for car info.

    ``where`` may also be one checkpoint file, or the authors' folder (kgn.pth and
    usn.pth, directly or in 2x/ and 4x/). Headers only, except the authors' resampler,
    whose scale is in its tensors. A broken file is listed with an ``error`` entry
    rather than failing the listing.
    """
    folder = weights_dir() if where is None else Path(where).expanduser()
    if where is not None and folder.is_file():
        if folder.name in OFFICIAL_FILES:
            return [_official_entry(folder.parent)]
        return [_checkpoint_entry(folder)]
    if not folder.is_dir():
        return []
    if where is None:
        paths = [*folder.glob("car_x*.safetensors"), *folder.glob("car_generic_x*.safetensors")]
        found = [
            _checkpoint_entry(path, "generic" if path.name.startswith("car_generic_") else "pair")
            for path in sorted(paths)
        ]
    else:  # a folder the user names: every checkpoint in it, each saying what it is
        found = [_checkpoint_entry(path) for path in sorted(folder.glob("*.safetensors"))]
        found += [
            _official_entry(sub)
            for sub in (folder, *(folder / f"{s}x" for s in SCALES))
            if _holds_official(sub)
        ]
    return found
