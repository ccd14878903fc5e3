"""The adapters a server knows (name -> PEFT-format directory) and the few of them resident in
the model, least recently used first out.

Files are read on a background thread, so a load never stalls the decoding loop for longer than
it takes to copy the tensors into the model; that copy, and every other change to the model,
happens on the scheduler's thread (see `engine.Engine`), the only one that touches the model.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import InputNotFoundError, UserError
from lorakit.lora import LoraConfig, LoraModel
from lorakit.lora.files import install_adapter, read_adapter_config, read_adapter_weights
from lorakit.lora.model import validate_adapter_name


class AdapterNotFound(UserError, KeyError):
    """A request named an adapter the server does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class AdapterFiles:
    """An adapter read from disk, not yet in the model."""

    name: str
    path: Path
    config: LoraConfig
    weights: dict[str, torch.Tensor]


class AdapterPool:
    """Known adapters by name, at most `max_loras` of them in `model` at once (LRU)."""

    def __init__(self, model: LoraModel, max_loras: int) -> None:
        if max_loras < 1:
            raise UserError(f"--max-loras must be at least 1 (got {max_loras})")
        self.model = model
        self.max_loras = max_loras
        self.paths: dict[str, Path] = {}  # every adapter a request may name
        self.resident: OrderedDict[str, None] = OrderedDict()  # in the model, oldest use first
        self.pins: Counter[str] = Counter()  # rows currently decoding with each adapter
        # what `lorakit serve` reports on GET /metrics, by adapter: installs into the model, LRU
        # evictions to make room, and requests admitted whose adapter was (hits) or was not
        # (misses) in the model when the scheduler first looked at them
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._reads: dict[str, Future] = {}  # files being read for these names
        self._lock = threading.Lock()  # paths and _reads are also read by the HTTP thread
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lorakit-adapter-read")

    # -- any thread -----------------------------------------------------------------------------
    def known(self) -> dict[str, Path]:
        with self._lock:
            return dict(self.paths)

    def read(self, name: str, path: str | Path, keep: bool = True) -> Future:
        """Read an adapter's files in the background; the future gives `AdapterFiles` or the
        error. With `keep`, the read is remembered under `name` until `take_read` (a read
        already under way or done for `name` is returned instead of starting another)."""
        validate_adapter_name(name)
        with self._lock:
            future = self._reads.get(name) if keep else None
            if future is None:
                future = self._reader.submit(_read, name, Path(path))
                if keep:
                    self._reads[name] = future
            return future

    def take_read(self, name: str) -> AdapterFiles:
        """The files of a finished read, which is then forgotten (raises the read's error)."""
        with self._lock:
            future = self._reads.pop(name)
        return future.result()

    def forget(self, name: str) -> None:
        with self._lock:
            if name not in self.paths:
                raise AdapterNotFound(f"adapter '{name}' is not loaded")
            del self.paths[name]

    # -- scheduler thread ----------------------------------------------------------------------
    def install(self, files: AdapterFiles) -> None:
        """Put read adapter files into the model (replacing an adapter of the same name), making
        room first; raises if the adapter does not fit the base (the model is left unchanged)."""
        if files.name in self.resident:
            if self.pins[files.name]:
                raise UserError(f"adapter '{files.name}' is in use by running requests")
            self._evict(files.name)
        if not self.make_room():
            raise UserError(
                f"all {self.max_loras} adapter slots are used by running requests; "
                "try again when some finish (or raise --max-loras)"
            )
        install_adapter(self.model, files.name, files.config, files.weights, files.path)
        self.resident[files.name] = None
        self.loads[files.name] += 1
        with self._lock:
            self.paths[files.name] = files.path

    def make_room(self) -> bool:
        """Evict least recently used unpinned adapters until one more fits."""
        while len(self.resident) >= self.max_loras:
            idle = next((n for n in self.resident if not self.pins[n]), None)
            if idle is None:
                return False
            self._evict(idle)
            self.evictions[idle] += 1
        return True

    def use(self, name: str, hit: bool = True) -> None:
        """Pin a resident adapter for one more row (`hit`: it was resident when asked for)."""
        self.resident.move_to_end(name)
        self.pins[name] += 1
        (self.hits if hit else self.misses)[name] += 1

    def release(self, name: str) -> None:
        self.pins[name] -= 1
        if self.pins[name] <= 0:
            del self.pins[name]
            if name not in self.known():  # unloaded while requests still used it
                self._evict(name)

    def drop_forgotten(self) -> None:
        """Remove adapters unloaded by the API once no running row uses them."""
        for name in [n for n in self.resident if n not in self.known() and not self.pins[n]]:
            self._evict(name)

    def _evict(self, name: str) -> None:
        if name in self.resident:
            del self.resident[name]
            self.model.delete_adapter(name)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


def _read(name: str, path: Path) -> AdapterFiles:
    if not path.is_dir():
        raise InputNotFoundError(f"adapter '{name}': {path} is not a directory")
    config = read_adapter_config(path)
    config.inference_mode = True
    return AdapterFiles(name, path, config, read_adapter_weights(path))
