"""A restricted, symbolic pickle machine for ``torch.save`` files, and the pickle writer.

Nothing in a checkpoint's pickle is ever executed and nothing is imported from it: the machine
below interprets the opcodes itself (protocols 0-5, what ``torch.save`` emits is protocol 2) and
builds only plain values — ``None``, bools, ints, floats, complex, str, bytes, bytearray,
tuples, lists, dicts, sets, ``collections.OrderedDict`` — plus symbolic records for the few torch
objects a checkpoint is made of: ``TensorRecord`` (``torch._utils._rebuild_tensor_v2`` /
``_rebuild_tensor_v3``), ``ParameterRecord`` (``_rebuild_parameter`` and
``_rebuild_parameter_with_state``), ``StorageRecord`` (persistent ids ``('storage',
torch.FloatStorage | ... | torch.storage.UntypedStorage, key, location, numel)``), ``TorchSize``,
``TorchDevice`` and ``TorchGlobal`` (a dtype or storage type used as a value). Any other global
is refused the moment it is named, before anything could run, with ``refusing to load
'posix.system': not tensor data``.

Everything is bounded so a hostile pickle fails fast as ``CheckpointError`` (never
``MemoryError`` or ``RecursionError``): the pickle's size, the stack, the mark stack, the memo,
the number of objects created, the size of integers, and nesting depth (tuples are measured as
they are built, since hashing a deep tuple recurses in C; everything else when the structure is
walked). String and bytes lengths are checked against the bytes left in the pickle before
anything is allocated, and storages against their zip member (by the caller's ``check_storage``).

**Tensor names** (``name_tensors``), chosen so that a plain state_dict keeps its usual names:

1. A root that is a dict whose keys are all strings and whose values are all tensors (a
   ``model.state_dict()``, a Hugging Face ``pytorch_model.bin``) names each tensor by its key,
   unchanged: ``layer.weight``.
2. Anything else names each tensor by its path from the root: dict keys and list/tuple indices
   joined by ``/``, each key escaped as in JSON Pointer (RFC 6901: ``~`` -> ``~0``, ``/`` ->
   ``~1``), integer keys and indices in decimal: ``state_dict/layer.weight``,
   ``optimizer_states/0/state/3/exp_avg``. Keys of other types (bool, None, float) are written
   as ``str(key)``; two paths that would give one name are refused. A tensor that is the root
   itself is named ``tensor``.

A tensor object reached a second time (one tensor referenced twice) keeps its first name; the
second path is reported in ``aliases``. Shared *storages* (tied weights: two tensors viewing one
storage) are separate tensors, reported by storage key.

**Optimizer state** (``optimizer_prefixes``): every dict shaped like ``Optimizer.state_dict()``
(keys ``state`` and ``param_groups``) anywhere in the structure — Lightning's
``optimizer_states/0/``, a top-level ``optimizer/``, a whole ``optimizer.pt`` (prefix ``""``) —
and the top-level keys ``optimizer``, ``optimizer_state_dict``, ``optimizer_states``,
``optimizers``, ``optim`` and ``optimizer_state``.
"""

from __future__ import annotations

import codecs
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ema_cli.errors import CheckpointError

#: Limits on what a pickle may build (see the module docstring).
MAX_PICKLE_BYTES = 1 << 30
MAX_STACK = 1_000_000
MAX_MARKS = 10_000
MAX_MEMO = 10_000_000
MAX_OBJECTS = 20_000_000
MAX_DEPTH = 100
MAX_INT_BYTES = 1024
MAX_DIMS = 64

# ---------------------------------------------------------------- torch dtypes and storages

#: torch dtype name -> numpy dtype spec; ``ml:`` names come from ml_dtypes, imported only when
#: a checkpoint holds such a tensor (it costs start-up time).
_DTYPE_SPECS: dict[str, str] = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "ml:bfloat16",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
    "float8_e4m3fn": "ml:float8_e4m3fn",
    "float8_e5m2": "ml:float8_e5m2",
    "float8_e4m3fnuz": "ml:float8_e4m3fnuz",
    "float8_e5m2fnuz": "ml:float8_e5m2fnuz",
    "float8_e8m0fnu": "ml:float8_e8m0fnu",
}

#: Legacy typed storage classes (``torch.FloatStorage``, ...) -> the dtype they hold. dtypes
#: without one (float8, uint16/32/64) are saved as ``UntypedStorage`` with
#: ``_rebuild_tensor_v3``, as torch does.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_STORAGE_FOR_DTYPE = {dtype: storage for storage, dtype in STORAGE_DTYPES.items()}

_dtype_cache: dict[str, np.dtype[Any]] = {}


def numpy_dtype(torch_name: str) -> np.dtype[Any]:
    """The numpy dtype of a torch dtype name (``float32``, ``bfloat16``, ...)."""
    dtype = _dtype_cache.get(torch_name)
    if dtype is None:
        spec = _DTYPE_SPECS[torch_name]
        if spec.startswith("ml:"):
            import ml_dtypes  # lazily: only files holding such tensors pay for it

            dtype = np.dtype(getattr(ml_dtypes, spec[3:]))
        else:
            dtype = np.dtype(spec)
        _dtype_cache[torch_name] = dtype
    return dtype


def torch_dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The torch name of a numpy dtype, or None when torch has none."""
    dtype = np.dtype(dtype)
    for name, spec in _DTYPE_SPECS.items():
        if spec.startswith("ml:"):
            if dtype.name == spec[3:]:  # numpy's own dtypes never have these names
                return name
        elif np.dtype(spec) == dtype:
            return name
    return None


# ---------------------------------------------------------------- symbolic records


@dataclass(frozen=True)
class TorchGlobal:
    """An allowed global used as a value: a dtype (``torch.float32``) or a storage type."""

    module: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class StorageRecord:
    """One storage: zip member ``<top>/data/<key>``, ``numel`` elements of ``dtype`` (None for
    an ``UntypedStorage``, whose numel counts bytes)."""

    key: str
    dtype: str | None
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * (1 if self.dtype is None else numpy_dtype(self.dtype).itemsize)


@dataclass(eq=False)
class TensorRecord:
    """A tensor: a view (offset, size, stride, in elements of ``dtype``) of a storage."""

    storage: StorageRecord
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    metadata: Any = None  # _rebuild_tensor's optional metadata dict, kept for the writer

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def contiguous(self) -> bool:
        """C-contiguous (dimensions of size 1 may have any stride, as in torch)."""
        if self.numel == 0:
            return True
        expected = 1
        for size, stride in zip(reversed(self.size), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(eq=False)
class ParameterRecord:
    """``torch.nn.Parameter(data, requires_grad)``, with the state of
    ``_rebuild_parameter_with_state`` when it had one."""

    data: TensorRecord
    requires_grad: bool
    state: Any = None


class TorchSize(tuple):  # type: ignore[type-arg]
    """``torch.Size(...)``: a tuple of ints that the writer saves as a ``torch.Size`` again."""

    __slots__ = ()


@dataclass(frozen=True)
class TorchDevice:
    """``torch.device(*args)``."""

    args: tuple[Any, ...]


_TORCH_RECORDS = (TensorRecord, ParameterRecord, StorageRecord, TorchSize, TorchDevice, TorchGlobal)

# ---------------------------------------------------------------- the allowlist

_CALLS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "torch.device",
        "_codecs.encode",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
    }
)
_VALUES = frozenset(
    {f"torch.{name}" for name in STORAGE_DTYPES}
    | {"torch.storage.UntypedStorage", "torch.UntypedStorage"}
    | {f"torch.{name}" for name in _DTYPE_SPECS}
)
#: Python 2 names that protocol 0-2 pickles use for builtins (pickle's fix_imports).
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_ENCODINGS = {"latin1": "latin-1", "latin-1": "latin-1", "utf-8": "utf-8", "utf8": "utf-8"}


class _Mark:
    __slots__ = ()


_MARK = _Mark()

#: ``check_storage(key, nbytes)``: the caller checks the zip member exists and holds ``nbytes``.
StorageCheck = Callable[[str, int], None]


class _Machine:
    """One run of the pickle machine over ``data``; ``run()`` returns the root object."""

    def __init__(self, path: str, data: bytes, check_storage: StorageCheck) -> None:
        self.path = path
        self.data = data
        self.pos = 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.objects = 0
        self.check_storage = check_storage
        self.storages: dict[str, StorageRecord] = {}
        # id -> (object, depth) of every tuple/frozenset built: kept alive so ids stay unique.
        self.depths: dict[int, tuple[object, int]] = {}

    # ---- helpers

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(self.path, f"data.pkl: {message}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(
                f"corrupt pickle: needs {n} bytes at offset {self.pos} but only "
                f"{len(self.data) - self.pos} remain"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.pos + 65536)
        if end < 0:
            raise self.fail(f"corrupt pickle: unterminated text argument at offset {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end + 1
        return chunk

    def push(self, value: Any) -> None:
        if len(self.stack) >= MAX_STACK:
            raise self.fail(f"pickle stack grows past {MAX_STACK} items: not a checkpoint")
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise self.fail(f"pickle builds more than {MAX_OBJECTS} objects: not a checkpoint")
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("corrupt pickle: stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("corrupt pickle: stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail("corrupt pickle: no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def depth(self, value: object) -> int:
        entry = self.depths.get(id(value))
        return entry[1] if entry is not None and entry[0] is value else 0

    def tuple_of(self, items: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
        result = tuple(items)
        if result:
            d = 1 + max(self.depth(v) for v in result)
            if d > MAX_DEPTH:
                raise self.fail(f"values nested deeper than {MAX_DEPTH} levels: not a checkpoint")
            self.depths[id(result)] = (result, d)
        return result

    def hashable(self, value: Any, what: str) -> Any:
        if isinstance(value, (list, dict, set, bytearray)):
            raise self.fail(f"corrupt pickle: unhashable {type(value).__name__} as {what}")
        return value

    def put(self, index: int) -> None:
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise self.fail(f"pickle memo grows past {MAX_MEMO} entries: not a checkpoint")
        self.memo[index] = self.top()

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise self.fail(f"corrupt pickle: memo entry {index} used before it is set")
        self.push(self.memo[index])

    def global_(self, module: str, name: str) -> TorchGlobal:
        module = _MODULE_ALIASES.get(module, module)
        full = f"{module}.{name}"
        if full not in _CALLS and full not in _VALUES:
            raise CheckpointError(self.path, f"refusing to load {full!r}: not tensor data")
        return TorchGlobal(module, name)

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self.fail(f"corrupt pickle: {what} is not UTF-8") from None

    def long(self, raw: bytes) -> int:
        if len(raw) > MAX_INT_BYTES:
            raise self.fail(f"integer of {len(raw)} bytes: not a checkpoint")
        return int.from_bytes(raw, "little", signed=True)

    # ---- the main loop

    def run(self) -> Any:
        try:
            return self._run()
        except CheckpointError:
            raise
        except (
            ValueError,
            TypeError,
            AttributeError,
            UnicodeError,
            KeyError,
            IndexError,
            OverflowError,
            struct.error,
            RecursionError,
            MemoryError,
        ) as e:
            raise self.fail(f"corrupt pickle at offset {self.pos} ({type(e).__name__})") from None

    def _run(self) -> Any:
        data = self.data
        while True:
            if self.pos >= len(data):
                raise CheckpointError(self.path, "data.pkl: corrupt pickle: ends without STOP")
            op = data[self.pos]
            self.pos += 1
            handler = _OPS.get(op)
            if handler is None:
                raise self.fail(f"corrupt pickle: unknown opcode 0x{op:02x} at {self.pos - 1}")
            if handler(self):
                if self.marks or len(self.stack) != 1:
                    raise self.fail("corrupt pickle: STOP with a malformed stack")
                return self.stack[0]

    # ---- calls: what REDUCE does with each allowed function

    def call(self, func: Any, args: Any) -> Any:
        if not isinstance(func, TorchGlobal):
            raise self.fail(f"corrupt pickle: REDUCE calls a {type(func).__name__}")
        if not isinstance(args, tuple):
            raise self.fail("corrupt pickle: REDUCE arguments are not a tuple")
        name = func.full_name
        if name not in _CALLS:
            raise CheckpointError(self.path, f"refusing to call {name!r}: not tensor data")
        if name == "collections.OrderedDict":
            result: Any = OrderedDict()
            if args:
                for pair in args[0]:
                    key, value = pair
                    result[self.hashable(key, "dict key")] = value
            return result
        if name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"):
            return self.rebuild_tensor(args, v3=name.endswith("v3"))
        if name.startswith("torch._utils._rebuild_parameter"):
            with_state = name.endswith("_with_state")
            if len(args) != (4 if with_state else 3) or not isinstance(args[0], TensorRecord):
                raise self.fail(f"corrupt pickle: bad arguments to {name}")
            return ParameterRecord(args[0], bool(args[1]), args[3] if with_state else None)
        if name == "torch.Size":
            if len(args) != 1 or not all(_is_dim(d) for d in args[0]):
                raise self.fail("corrupt pickle: bad torch.Size")
            return TorchSize(args[0])
        if name == "torch.device":
            if not 1 <= len(args) <= 2 or not isinstance(args[0], str):
                raise self.fail("corrupt pickle: bad torch.device")
            return TorchDevice(self.tuple_of(args))
        if name == "_codecs.encode":
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in _ENCODINGS:
                raise self.fail("corrupt pickle: bad _codecs.encode")
            return codecs.encode(args[0], _ENCODINGS[args[1]])
        if name in ("builtins.set", "builtins.frozenset"):
            items = [self.hashable(v, "set item") for v in (args[0] if args else ())]
            if name == "builtins.set":
                return set(items)
            result = frozenset(items)
            self.depths[id(result)] = (result, 1 + max((self.depth(v) for v in items), default=0))
            return result
        if name == "builtins.bytearray":
            if args and not isinstance(args[0], (bytes, list)):
                raise self.fail("corrupt pickle: bad bytearray")
            return bytearray(args[0] if args else b"")
        # builtins.complex
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
            raise self.fail("corrupt pickle: bad complex")
        return complex(*args)

    def rebuild_tensor(self, args: tuple[Any, ...], v3: bool) -> TensorRecord:
        fn = "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2"
        if len(args) not in ((7, 8) if v3 else (6, 7)):
            raise self.fail(f"corrupt pickle: {fn} takes 6-8 arguments, got {len(args)}")
        storage, offset, size, stride, requires_grad = args[:5]
        metadata = args[7 if v3 else 6] if len(args) == (8 if v3 else 7) else None
        if not isinstance(storage, StorageRecord):
            raise self.fail(f"corrupt pickle: {fn} without a storage")
        if v3:
            dtype_global = args[6]
            if (
                not isinstance(dtype_global, TorchGlobal)
                or dtype_global.module != "torch"
                or dtype_global.name not in _DTYPE_SPECS
            ):
                raise self.fail(f"corrupt pickle: {fn} without a dtype")
            dtype = dtype_global.name
        elif storage.dtype is None:
            raise self.fail(f"corrupt pickle: {fn} of an untyped storage without a dtype")
        else:
            dtype = storage.dtype
        if (
            not _is_dim(offset)
            or not isinstance(size, tuple)
            or not isinstance(stride, tuple)
            or len(size) != len(stride)
            or len(size) > MAX_DIMS
            or not all(_is_dim(d) for d in size)
            or not all(_is_dim(s) for s in stride)
        ):
            raise self.fail(f"corrupt pickle: bad tensor geometry in {fn}")
        if metadata is not None and not isinstance(metadata, dict):
            raise self.fail(f"corrupt pickle: bad tensor metadata in {fn}")
        itemsize = numpy_dtype(dtype).itemsize
        if storage.dtype is not None and numpy_dtype(storage.dtype).itemsize != itemsize:
            raise self.fail(f"corrupt pickle: {dtype} tensor on a {storage.dtype} storage")
        record = TensorRecord(
            storage, offset, TorchSize(size), tuple(stride), dtype, bool(requires_grad), metadata
        )
        if record.numel:
            extent = offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True)) + 1
            if extent * itemsize > storage.nbytes:
                raise self.fail(
                    f"tensor of shape {list(size)} (offset {offset}, stride {list(stride)}) "
                    f"reaches past the end of storage '{storage.key}' "
                    f"({storage.nbytes} bytes): corrupt"
                )
        return record

    def persistent(self, pid: Any) -> StorageRecord:
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise self.fail("corrupt pickle: persistent id is not a storage")
        typename, storage_type, key, location, numel = pid
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if typename != "storage":
            raise self.fail(f"refusing persistent id of kind {str(typename)[:40]!r}: not a storage")
        if not isinstance(storage_type, TorchGlobal) or storage_type.full_name not in _VALUES:
            raise self.fail("corrupt pickle: storage without a storage type")
        if storage_type.name == "UntypedStorage":
            dtype = None
        elif storage_type.name in STORAGE_DTYPES:
            dtype = STORAGE_DTYPES[storage_type.name]
        else:
            raise self.fail(f"corrupt pickle: {storage_type.full_name} is not a storage type")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key in (".", ".."):
            raise self.fail("corrupt pickle: bad storage key")
        if not isinstance(location, str) or not _is_dim(numel):
            raise self.fail(f"corrupt pickle: bad storage '{key}'")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.numel != numel:
                raise self.fail(f"corrupt pickle: storage '{key}' declared twice differently")
            return known
        record = StorageRecord(key, dtype, location, numel)
        self.check_storage(key, record.nbytes)
        self.storages[key] = record
        return record


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- opcode handlers: each returns True only for STOP


def _op_mark(m: _Machine) -> bool:
    if len(m.marks) >= MAX_MARKS:
        raise m.fail(f"more than {MAX_MARKS} nested MARKs: not a checkpoint")
    m.marks.append(len(m.stack))
    return False


def _op_stop(m: _Machine) -> bool:
    return True


def _op_pop(m: _Machine) -> bool:
    if m.marks and len(m.stack) == m.marks[-1]:
        m.marks.pop()  # POP of a MARK, as pickle does
    else:
        m.pop()
    return False


def _op_pop_mark(m: _Machine) -> bool:
    m.pop_mark()
    return False


def _op_dup(m: _Machine) -> bool:
    m.push(m.top())
    return False


def _op_frame(m: _Machine) -> bool:
    (length,) = struct.unpack("<Q", m.take(8))
    if length > len(m.data) - m.pos:
        raise m.fail("corrupt pickle: FRAME longer than the pickle")
    return False


def _op_proto(m: _Machine) -> bool:
    if m.take(1)[0] > 5:
        raise m.fail("unsupported pickle protocol (newer than 5)")
    return False


def _push_const(value: Any) -> Callable[[_Machine], bool]:
    def handler(m: _Machine) -> bool:
        m.push(value)
        return False

    return handler


def _op_int(m: _Machine) -> bool:
    raw = m.line()
    if raw in (b"00", b"01"):
        m.push(raw == b"01")
    else:
        if len(raw) > 4000:
            raise m.fail("integer too long: not a checkpoint")
        m.push(int(raw))
    return False


def _op_long(m: _Machine) -> bool:
    raw = m.line().rstrip(b"L")
    if len(raw) > 4000:
        raise m.fail("integer too long: not a checkpoint")
    m.push(int(raw))
    return False


def _op_float(m: _Machine) -> bool:
    m.push(float(m.line()))
    return False


def _fixed(fmt: str) -> Callable[[_Machine], bool]:
    size = struct.calcsize(fmt)

    def handler(m: _Machine) -> bool:
        (value,) = struct.unpack(fmt, m.take(size))
        m.push(value)
        return False

    return handler


def _op_long1(m: _Machine) -> bool:
    m.push(m.long(m.take(m.take(1)[0])))
    return False


def _op_long4(m: _Machine) -> bool:
    (n,) = struct.unpack("<i", m.take(4))
    m.push(m.long(m.take(n)))
    return False


def _unicode(length_fmt: str) -> Callable[[_Machine], bool]:
    size = struct.calcsize(length_fmt)

    def handler(m: _Machine) -> bool:
        (n,) = struct.unpack(length_fmt, m.take(size))
        m.push(m.text(m.take(n), "string"))
        return False

    return handler


def _binbytes(length_fmt: str, as_str: bool = False) -> Callable[[_Machine], bool]:
    size = struct.calcsize(length_fmt)

    def handler(m: _Machine) -> bool:
        (n,) = struct.unpack(length_fmt, m.take(size))
        raw = m.take(n)
        # Python 2 ``str`` (BINSTRING): torch.load decodes them as UTF-8
        m.push(m.text(raw, "string") if as_str else raw)
        return False

    return handler


def _op_bytearray8(m: _Machine) -> bool:
    (n,) = struct.unpack("<Q", m.take(8))
    m.push(bytearray(m.take(n)))
    return False


def _op_unicode(m: _Machine) -> bool:
    try:
        m.push(m.line().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise m.fail("corrupt pickle: bad UNICODE argument") from None
    return False


def _op_string(m: _Machine) -> bool:
    raw = m.line()
    if len(raw) < 2 or raw[0] != raw[-1] or raw[:1] not in (b"'", b'"'):
        raise m.fail("corrupt pickle: bad STRING argument")
    value = codecs.escape_decode(raw[1:-1])[0]
    m.push(m.text(value, "string"))
    return False


def _op_empty_tuple(m: _Machine) -> bool:
    m.push(())
    return False


def _tuple_n(n: int) -> Callable[[_Machine], bool]:
    def handler(m: _Machine) -> bool:
        items = [m.pop() for _ in range(n)][::-1]
        m.push(m.tuple_of(items))
        return False

    return handler


def _op_tuple(m: _Machine) -> bool:
    m.push(m.tuple_of(m.pop_mark()))
    return False


def _op_list(m: _Machine) -> bool:
    m.push(m.pop_mark())
    return False


def _op_dict(m: _Machine) -> bool:
    items = m.pop_mark()
    if len(items) % 2:
        raise m.fail("corrupt pickle: DICT with an odd number of items")
    m.push({m.hashable(items[i], "dict key"): items[i + 1] for i in range(0, len(items), 2)})
    return False


def _op_append(m: _Machine) -> bool:
    item = m.pop()
    target = m.top()
    if type(target) is not list:
        raise m.fail(f"corrupt pickle: APPEND to a {type(target).__name__}")
    target.append(item)
    return False


def _op_appends(m: _Machine) -> bool:
    items = m.pop_mark()
    target = m.top()
    if type(target) is not list:
        raise m.fail(f"corrupt pickle: APPENDS to a {type(target).__name__}")
    target.extend(items)
    return False


def _setitems(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    if not isinstance(target, dict) or type(target) not in (dict, OrderedDict):
        raise m.fail(f"corrupt pickle: SETITEM on a {type(target).__name__}")
    if len(items) % 2:
        raise m.fail("corrupt pickle: SETITEMS with an odd number of items")
    for i in range(0, len(items), 2):
        target[m.hashable(items[i], "dict key")] = items[i + 1]


def _op_setitem(m: _Machine) -> bool:
    value = m.pop()
    key = m.pop()
    _setitems(m, [key, value])
    return False


def _op_setitems(m: _Machine) -> bool:
    _setitems(m, m.pop_mark())
    return False


def _op_additems(m: _Machine) -> bool:
    items = m.pop_mark()
    target = m.top()
    if type(target) is not set:
        raise m.fail(f"corrupt pickle: ADDITEMS to a {type(target).__name__}")
    target.update(m.hashable(v, "set item") for v in items)
    return False


def _op_frozenset(m: _Machine) -> bool:
    items = [m.hashable(v, "set item") for v in m.pop_mark()]
    result = frozenset(items)
    m.depths[id(result)] = (result, 1 + max((m.depth(v) for v in items), default=0))
    if m.depths[id(result)][1] > MAX_DEPTH:
        raise m.fail(f"values nested deeper than {MAX_DEPTH} levels: not a checkpoint")
    m.push(result)
    return False


def _op_global(m: _Machine) -> bool:
    module = m.text(m.line(), "global name")
    name = m.text(m.line(), "global name")
    m.push(m.global_(module, name))
    return False


def _op_stack_global(m: _Machine) -> bool:
    name = m.pop()
    module = m.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise m.fail("corrupt pickle: STACK_GLOBAL of non-strings")
    m.push(m.global_(module, name))
    return False


def _op_inst(m: _Machine) -> bool:
    module = m.text(m.line(), "global name")
    name = m.text(m.line(), "global name")
    found = m.global_(module, name)
    raise CheckpointError(m.path, f"refusing to instantiate {found.full_name!r}: not tensor data")


def _op_obj(m: _Machine) -> bool:
    items = m.pop_mark()
    cls = items[0] if items else None
    what = cls.full_name if isinstance(cls, TorchGlobal) else type(cls).__name__
    raise CheckpointError(m.path, f"refusing to instantiate {what!r}: not tensor data")


def _op_newobj(m: _Machine) -> bool:
    m.pop()
    cls = m.pop()
    what = cls.full_name if isinstance(cls, TorchGlobal) else type(cls).__name__
    raise CheckpointError(m.path, f"refusing to instantiate {what!r}: not tensor data")


def _op_newobj_ex(m: _Machine) -> bool:
    m.pop()
    return _op_newobj(m)


def _op_ext(m: _Machine) -> bool:
    raise CheckpointError(m.path, "refusing to load an extension-registry global: not tensor data")


def _op_buffer(m: _Machine) -> bool:
    raise m.fail("refusing out-of-band pickle buffers: not tensor data")


def _op_reduce(m: _Machine) -> bool:
    args = m.pop()
    func = m.pop()
    m.push(m.call(func, args))
    return False


def _op_build(m: _Machine) -> bool:
    state = m.pop()
    target = m.top()
    if type(target) is not OrderedDict:
        raise m.fail(f"corrupt pickle: BUILD on a {type(target).__name__}")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise m.fail("corrupt pickle: BUILD state of an OrderedDict is not a dict")
    target.__dict__.update(state)  # state_dict._metadata, as torch.load sets it
    return False


def _op_persid(m: _Machine) -> bool:
    m.line()
    raise m.fail("refusing text persistent ids: not torch storages")


def _op_binpersid(m: _Machine) -> bool:
    m.push(m.persistent(m.pop()))
    return False


def _memo_op(kind: str, fmt: str | None) -> Callable[[_Machine], bool]:
    size = struct.calcsize(fmt) if fmt else 0

    def handler(m: _Machine) -> bool:
        if fmt is None:
            raw = m.line()
            if len(raw) > 20:
                raise m.fail("corrupt pickle: bad memo index")
            index = int(raw)
        else:
            (index,) = struct.unpack(fmt, m.take(size))
        if kind == "get":
            m.get(index)
        else:
            m.put(index)
        return False

    return handler


def _op_memoize(m: _Machine) -> bool:
    m.put(len(m.memo))
    return False


_OPS: dict[int, Callable[[_Machine], bool]] = {
    ord("("): _op_mark,
    ord("."): _op_stop,
    ord("0"): _op_pop,
    ord("1"): _op_pop_mark,
    ord("2"): _op_dup,
    ord("F"): _op_float,
    ord("I"): _op_int,
    ord("J"): _fixed("<i"),
    ord("K"): _fixed("<B"),
    ord("L"): _op_long,
    ord("M"): _fixed("<H"),
    ord("N"): _push_const(None),
    ord("P"): _op_persid,
    ord("Q"): _op_binpersid,
    ord("R"): _op_reduce,
    ord("S"): _op_string,
    ord("T"): _binbytes("<I", as_str=True),
    ord("U"): _binbytes("<B", as_str=True),
    ord("V"): _op_unicode,
    ord("X"): _unicode("<I"),
    ord("a"): _op_append,
    ord("b"): _op_build,
    ord("c"): _op_global,
    ord("d"): _op_dict,
    ord("}"): _push_const(None),  # replaced below: each needs a fresh object
    ord("e"): _op_appends,
    ord("g"): _memo_op("get", None),
    ord("h"): _memo_op("get", "<B"),
    ord("i"): _op_inst,
    ord("j"): _memo_op("get", "<I"),
    ord("l"): _op_list,
    ord("]"): _push_const(None),
    ord("o"): _op_obj,
    ord("p"): _memo_op("put", None),
    ord("q"): _memo_op("put", "<B"),
    ord("r"): _memo_op("put", "<I"),
    ord("s"): _op_setitem,
    ord("t"): _op_tuple,
    ord(")"): _op_empty_tuple,
    ord("u"): _op_setitems,
    ord("G"): _fixed(">d"),
    0x80: _op_proto,
    0x81: _op_newobj,
    0x82: _op_ext,
    0x83: _op_ext,
    0x84: _op_ext,
    0x85: _tuple_n(1),
    0x86: _tuple_n(2),
    0x87: _tuple_n(3),
    0x88: _push_const(True),
    0x89: _push_const(False),
    0x8A: _op_long1,
    0x8B: _op_long4,
    ord("B"): _binbytes("<I"),
    ord("C"): _binbytes("<B"),
    0x8C: _unicode("<B"),
    0x8D: _unicode("<Q"),
    0x8E: _binbytes("<Q"),
    0x8F: _push_const(None),
    0x90: _op_additems,
    0x91: _op_frozenset,
    0x92: _op_newobj_ex,
    0x93: _op_stack_global,
    0x94: _op_memoize,
    0x95: _op_frame,
    0x96: _op_bytearray8,
    0x97: _op_buffer,
    0x98: _op_buffer,
}


def _fresh(factory: Callable[[], Any]) -> Callable[[_Machine], bool]:
    def handler(m: _Machine) -> bool:
        m.push(factory())
        return False

    return handler


_OPS[ord("}")] = _fresh(dict)
_OPS[ord("]")] = _fresh(list)
_OPS[0x8F] = _fresh(set)


def unpickle(path: str, data: bytes, check_storage: StorageCheck) -> Any:
    """The symbolic value of pickle ``data`` (a ``data.pkl``) of checkpoint ``path``.

    ``check_storage(key, nbytes)`` is called once per storage as it is first named, so an
    oversized or missing storage fails before the rest is read.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(path, f"data.pkl is over {MAX_PICKLE_BYTES} bytes: not a checkpoint")
    return _Machine(path, data, check_storage).run()


# ---------------------------------------------------------------- naming tensors


#: Top-level keys whose contents are optimizer state.
OPTIMIZER_KEYS = frozenset(
    {"optimizer", "optimizer_state_dict", "optimizer_states", "optimizers", "optim"}
    | {"optimizer_state"}
)

#: The name of a tensor that is the whole pickle (``torch.save(tensor, f)``).
ROOT_TENSOR_NAME = "tensor"


def escape_key(key: Any) -> str:
    """One path component: JSON Pointer escaping (``~`` -> ``~0``, ``/`` -> ``~1``)."""
    text = key if isinstance(key, str) else str(key)
    return text.replace("~", "~0").replace("/", "~1")


@dataclass
class NamedTensors:
    """What ``name_tensors`` finds in a structure."""

    #: name -> the tensor (or parameter) record, in pickle order.
    tensors: dict[str, TensorRecord | ParameterRecord] = field(default_factory=dict)
    #: second path -> first name, for one tensor object reached twice.
    aliases: dict[str, str] = field(default_factory=dict)
    #: descriptions of the non-tensor values (the largest tensor-free subtrees).
    non_tensors: list[str] = field(default_factory=list)
    #: name prefixes of optimizer state (see the module docstring).
    optimizer_prefixes: list[str] = field(default_factory=list)
    #: True when names follow rule 1 (a flat ``str -> tensor`` dict).
    flat: bool = False


def tensor_of(record: TensorRecord | ParameterRecord) -> TensorRecord:
    return record.data if isinstance(record, ParameterRecord) else record


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (TensorRecord, ParameterRecord))


def _is_optimizer_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
    )


class _Attributes:
    """The key ``children`` gives an OrderedDict's attributes (``state_dict._metadata``)."""

    __slots__ = ()


ATTRIBUTES = _Attributes()

#: A value that expands to more items than this (shared references counted each time they
#: appear) is refused: a pickle bomb for anything that prints or copies it naively.
MAX_EXPANDED = 10_000_000


def children(value: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of a container, in the order the writer saves them."""
    if isinstance(value, dict):
        yield from value.items()
        if type(value) is OrderedDict and value.__dict__:
            yield ATTRIBUTES, value.__dict__
    elif isinstance(value, (list, tuple)) and not isinstance(value, TorchSize):
        yield from enumerate(value)
    elif isinstance(value, (set, frozenset)):
        for item in value:
            yield None, item
    elif isinstance(value, ParameterRecord) and value.state is not None:
        yield None, value.state
    elif isinstance(value, TensorRecord) and value.metadata is not None:
        yield None, value.metadata
    elif isinstance(value, TorchDevice):
        yield None, value.args


def name_tensors(path: str, root: Any) -> NamedTensors:
    """Name every tensor in ``root`` (the rule is in the module docstring), checking the
    structure: depth at most ``MAX_DEPTH``, no cycles, every container visited once."""
    found = NamedTensors()
    if (
        isinstance(root, dict)
        and root
        and all(isinstance(k, str) for k in root)
        and all(_is_tensor(v) for v in root.values())
    ):
        found.flat = True
        first_names: dict[int, str] = {}
        for key, value in root.items():
            if id(value) in first_names:
                found.aliases[key] = first_names[id(value)]
            else:
                first_names[id(value)] = key
                found.tensors[key] = value
        _check_structure(path, root)
        return found
    if _is_tensor(root):
        found.tensors[ROOT_TENSOR_NAME] = root
        return found
    seen_tensors: dict[int, str] = {}
    done: dict[int, tuple[bool, int]] = {}  # container id -> (holds a tensor, expanded size)
    active: set[int] = set()

    def walk(value: Any, parts: list[str], depth: int) -> tuple[bool, int]:
        """Whether ``value`` holds a tensor, and how many items it expands to."""
        name = "/".join(parts)
        if _is_tensor(value):
            first = seen_tensors.get(id(value))
            if first is not None:
                found.aliases[name] = first
                return True, 1
            if name in found.tensors:
                raise CheckpointError(path, f"two values give the tensor name {name!r}")
            seen_tensors[id(value)] = name
            found.tensors[name] = value
            return True, 1
        if not isinstance(value, (dict, list, tuple, set, frozenset)) or isinstance(
            value, TorchSize
        ):
            return False, 1
        if id(value) in active:
            raise CheckpointError(path, f"self-referencing value at {name!r}: not supported")
        if id(value) in done:
            return done[id(value)]
        if depth >= MAX_DEPTH:
            raise CheckpointError(path, f"values nested deeper than {MAX_DEPTH} levels")
        active.add(id(value))
        if _is_optimizer_dict(value) or (depth == 1 and parts[0] in OPTIMIZER_KEYS):
            prefix = name + "/" if parts else ""
            if not any(prefix.startswith(p) for p in found.optimizer_prefixes):
                found.optimizer_prefixes.append(prefix)
        results: list[tuple[str, Any, bool]] = []
        size = 1
        for key, child in children(value):
            if isinstance(value, (set, frozenset)):
                if _is_tensor(child):
                    raise CheckpointError(path, f"a tensor inside a set at {name!r}")
                size += walk(child, [*parts, "?"], depth + 1)[1]
            elif key is ATTRIBUTES:
                holds, n = walk(child, [*parts, "?"], depth + 1)
                if holds:
                    raise CheckpointError(path, f"a tensor in the attributes of {name!r}")
                size += n
            else:
                if _has_tensor(key):
                    raise CheckpointError(path, f"a tensor as a dict key in {name!r}")
                child_parts = [*parts, escape_key(key)]
                holds, n = walk(child, child_parts, depth + 1)
                results.append(("/".join(child_parts), child, holds))
                size += n
            if size > MAX_EXPANDED:
                raise CheckpointError(
                    path,
                    f"value {name!r} expands to more than {MAX_EXPANDED} items (a pickle bomb)",
                )
        active.discard(id(value))
        holds = any(r[2] for r in results)
        if holds:
            for child_name, child, child_holds in results:
                if not child_holds:
                    found.non_tensors.append(f"value '{child_name}' ({_describe(child)})")
        done[id(value)] = (holds, size)
        return holds, size

    if not walk(root, [], 0)[0]:
        found.non_tensors.append(f"the pickled value ({_describe(root)}, no tensors)")
    return found


def _has_tensor(value: Any) -> bool:
    if _is_tensor(value):
        return True
    return isinstance(value, tuple) and any(_has_tensor(v) for v in value)


def _check_structure(path: str, root: dict[Any, Any]) -> None:
    """A flat state_dict's attributes (``_metadata``) are checked for depth and cycles too."""
    if type(root) is OrderedDict and root.__dict__:
        sub = name_tensors(path, [root.__dict__])
        if sub.tensors:
            raise CheckpointError(path, "a tensor in the state_dict's attributes")


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list, tuple, set, frozenset)) and not isinstance(value, TorchSize):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def is_optimizer_name(name: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


# ---------------------------------------------------------------- the writer's pickler


class PickleWriteError(ValueError):
    """A value the writer cannot save so that ``torch.load(weights_only=True)`` loads it."""


#: Opcodes the writer emits, all of them in torch's weights-only unpickler.
_PROTO2 = b"\x80\x02"


class TorchPickler:
    """Pickles a structure of plain values and records the way ``torch.save`` does (protocol
    2, every container memoized), using only what ``torch.load(weights_only=True)`` accepts.

    ``storage_key(record)`` gives the key a storage is saved under; storages are collected in
    ``storages`` in the order they are first met, as torch numbers them.
    """

    def __init__(self, storage_key: Callable[[StorageRecord], str]) -> None:
        self.out = bytearray()
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps memoized objects alive: their ids stay unique
        self.globals: dict[tuple[str, str], int] = {}
        self.storage_key = storage_key

    def dumps(self, root: Any) -> bytes:
        self.out += _PROTO2
        self.save(root, 0)
        self.out += b"."
        return bytes(self.out)

    def memoize(self, obj: Any) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = index
        self.keep.append(obj)
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def get(self, obj: Any) -> bool:
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def global_(self, module: str, name: str) -> None:
        index = self.globals.get((module, name))
        if index is not None:
            self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
            return
        self.out += f"c{module}\n{name}\n".encode()
        index = len(self.memo)
        self.memo[id((module, name))] = index
        self.keep.append((module, name))
        self.globals[(module, name)] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def save(self, obj: Any, depth: int) -> None:
        if depth > MAX_DEPTH + 8:
            raise PickleWriteError(f"values nested deeper than {MAX_DEPTH} levels")
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True:
            out += b"\x88"
        elif obj is False:
            out += b"\x89"
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            if self.get(obj):
                return
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
            self.memoize(obj)
        elif self.get(obj):
            return
        elif isinstance(obj, TorchSize):
            self.global_("torch", "Size")
            self.save_tuple(tuple(obj), depth)
            out += b"\x85R"
            self.memoize(obj)
        elif isinstance(obj, tuple):
            self.save_tuple(obj, depth)
            if obj:
                self.memoize(obj)
        elif isinstance(obj, list):
            out += b"]"
            self.memoize(obj)
            self.save_batches(obj, depth, b"e")
        elif type(obj) is OrderedDict:
            self.global_("collections", "OrderedDict")
            out += b")R"
            self.memoize(obj)
            self.save_dict_items(obj, depth)
            if obj.__dict__:
                self.save(dict(obj.__dict__), depth + 1)
                out += b"b"
        elif type(obj) is dict:
            out += b"}"
            self.memoize(obj)
            self.save_dict_items(obj, depth)
        elif isinstance(obj, TensorRecord):
            self.save_tensor(obj, depth)
        elif isinstance(obj, ParameterRecord):
            with_state = obj.state is not None
            name = "_rebuild_parameter_with_state" if with_state else "_rebuild_parameter"
            self.global_("torch._utils", name)
            out += b"("
            self.save(obj.data, depth + 1)
            self.save(obj.requires_grad, depth + 1)
            self.save_empty_ordered_dict()
            if with_state:
                self.save(obj.state, depth + 1)
            out += b"tR"
            self.memoize(obj)
        elif isinstance(obj, TorchDevice):
            self.global_("torch", "device")
            self.save_tuple(obj.args, depth)
            out += b"R"
            self.memoize(obj)
        elif isinstance(obj, TorchGlobal):
            self.global_(obj.module, obj.name)
        elif isinstance(obj, bytes):
            self.global_("_codecs", "encode")
            self.save(obj.decode("latin-1"), depth + 1)
            self.save("latin1", depth + 1)
            out += b"\x86R"
            self.memoize(obj)
        elif isinstance(obj, bytearray):
            self.global_("builtins", "bytearray")
            self.save(bytes(obj), depth + 1)
            out += b"\x85R"
            self.memoize(obj)
        elif isinstance(obj, complex):
            self.global_("builtins", "complex")
            self.save(obj.real, depth + 1)
            self.save(obj.imag, depth + 1)
            out += b"\x86R"
            self.memoize(obj)
        elif type(obj) is set:
            self.global_("builtins", "set")
            self.save(sorted(obj, key=repr) if _sortable(obj) else list(obj), depth + 1)
            out += b"\x85R"
            self.memoize(obj)
        else:
            raise PickleWriteError(
                f"cannot save a {type(obj).__name__} so that torch.load(weights_only=True) loads it"
            )

    def save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            n = (value.bit_length() + 8) // 8
            if n > 255:
                raise PickleWriteError("an integer over 255 bytes (torch.load cannot read it)")
            raw = value.to_bytes(n, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def save_tuple(self, obj: tuple[Any, ...], depth: int) -> None:
        if not obj:
            self.out += b")"
            return
        if len(obj) <= 3:
            for item in obj:
                self.save(item, depth + 1)
            self.out += bytes([0x84 + len(obj)])
            return
        self.out += b"("
        for item in obj:
            self.save(item, depth + 1)
        self.out += b"t"

    def save_batches(self, items: list[Any], depth: int, op: bytes) -> None:
        for start in range(0, len(items), 1000):
            self.out += b"("
            for item in items[start : start + 1000]:
                self.save(item, depth + 1)
            self.out += op

    def save_dict_items(self, obj: Mapping[Any, Any], depth: int) -> None:
        items = list(obj.items())
        for start in range(0, len(items), 1000):
            self.out += b"("
            for key, value in items[start : start + 1000]:
                self.save(key, depth + 1)
                self.save(value, depth + 1)
            self.out += b"u"

    def save_empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"
        self.memoize(OrderedDict())

    def save_tensor(self, record: TensorRecord, depth: int) -> None:
        v3 = record.dtype not in _STORAGE_FOR_DTYPE
        self.global_("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        self.out += b"(("
        self.save("storage", depth + 1)
        storage = record.storage
        if v3:
            self.global_("torch.storage", "UntypedStorage")
            numel = storage.nbytes
        else:
            self.global_("torch", _STORAGE_FOR_DTYPE[record.dtype])
            numel = storage.nbytes // numpy_dtype(record.dtype).itemsize
        self.save(self.storage_key(storage), depth + 1)
        self.save(storage.location, depth + 1)
        self.save_int(numel)
        self.out += b"tQ"
        self.save_int(record.storage_offset)
        self.save_tuple(tuple(record.size), depth + 1)
        self.save_tuple(tuple(record.stride), depth + 1)
        self.save(record.requires_grad, depth + 1)
        self.save_empty_ordered_dict()
        if v3:
            self.global_("torch", record.dtype)
        if record.metadata is not None:
            self.save(record.metadata, depth + 1)
        self.out += b"tR"
        self.memoize(record)


def _sortable(items: set[Any]) -> bool:
    return all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in items)


def check_savable(root: Any) -> None:
    """Raise ``PickleWriteError`` if ``root`` holds a value the writer cannot save (a
    frozenset: torch's weights-only unpickler has no ``FROZENSET``)."""
    pickler = TorchPickler(lambda s: s.key)
    pickler.dumps(root)
