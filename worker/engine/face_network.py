"""dlib's face descriptor network, run with numpy's BLAS instead of dlib's own loops.

dlib's wheels (``dlib-bin``) are built without BLAS: its ResNet took three quarters of a person
studio's upload check (76-80 ms of CPU a face, docs/benchmarks.md). The same network as matrix
products on numpy's OpenBLAS gives the same 128 numbers (to float rounding) for a ninth of the CPU
(``bench/likeness.py`` measures both; ``tests/worker/engine/test_face_network.py`` compares them).

The weights are read from the model file itself (``dlib_face_recognition_resnet_model_v1.dat`` of
``face-recognition-models``). dlib writes a network from its input up: each layer's name, its
settings as packed integers and its parameters as a tensor of little-endian float32. The layout
this reader accepts is the one the model's authors trained (``dnn_face_recognition_ex.cpp``):

    input 150x150 RGB (each channel less its mean, / 256)
    con 7x7 /2 (32), affine, relu, max_pool 3x3 /2
    residual blocks: con 3x3, affine, relu, con 3x3, affine, [avg_pool 2x2 /2], add_prev, relu
        (a block with the avg_pool halves the size: its first con has stride 2, and the block's
        input reaches the sum through the pool; the sum pads the smaller of the two with zeros)
    avg_pool over everything, fc 256 -> 128 without bias

Anything else in the file is refused with :class:`FaceNetworkError`, not guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_SIDE = 150


class FaceNetworkError(ValueError):
    """The model file is not the network this module knows how to run."""


class _Reader:
    """dlib's serialization: packed integers, dlib floats, strings, '0'/'1' booleans, tensors."""

    def __init__(self, data: bytes, position: int = 0) -> None:
        self.data = data
        self.position = position

    def integer(self) -> int:
        # One control byte (the low 4 bits: how many bytes follow, 0x80: negative), then the
        # magnitude, little-endian.
        control = self.data[self.position]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.position + 1:self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0 ** exponent

    def text(self) -> str:
        size = self.integer()
        value = self.data[self.position:self.position + size].decode("ascii")
        self.position += size
        return value

    def tensor(self) -> np.ndarray:
        """A tensor (version 2: four dimensions, then raw float32), flat."""
        version = self.integer()
        if version != 2:
            raise FaceNetworkError(f"tensor format {version} at byte {self.position}; expected 2")
        count = 1
        for _ in range(4):
            count *= self.integer()
        end = self.position + 4 * count
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.position)
        self.position = end
        return values


@dataclass(frozen=True)
class _Conv:
    """A convolution with the affine layer after it folded in: weights (rows x*y*channels, filters)."""

    weights: np.ndarray
    bias: np.ndarray
    side: int
    stride: int
    padding: int


@dataclass(frozen=True)
class _Block:
    first: _Conv
    second: _Conv
    downsample: bool  # the block halves the size; its input is averaged 2x2 on the way to the sum


@dataclass(frozen=True)
class _Pool:
    side: int
    stride: int
    padding: int


# A layer's name as dlib writes it: a packed length (one byte for these), then the name.
_LAYER = re.compile(rb"\x01(?:\x05(con_4)|\x07(affine_)|\x05(relu_)|\x0a(max_pool_2)|\x0a(avg_pool_2)"
                    rb"|\x09(add_prev_)|\x04(fc_2))")


class FaceNetwork:
    """The descriptor network: ``describe(chips)`` -> one 128-D vector per 150x150 RGB face chip."""

    def __init__(self, path: Path) -> None:
        try:
            self._read(path.read_bytes())
        except FaceNetworkError as exc:
            raise FaceNetworkError(f"{path.name}: {exc}") from exc

    def _read(self, data: bytes) -> None:
        start = data.find(b"\x15input_rgb_image_sized")
        if start < 0:
            raise FaceNetworkError("no input_rgb_image_sized layer; not dlib's face descriptor")
        reader = _Reader(data, start - 1)  # the length's control byte comes first
        try:
            reader.text()
            self.means = np.array([reader.real(), reader.real(), reader.real()], dtype=np.float32)
            if (reader.integer(), reader.integer()) != (INPUT_SIDE, INPUT_SIDE):
                raise FaceNetworkError(f"the input is not {INPUT_SIDE}x{INPUT_SIDE}")
            layers = self._layers(reader)
        except FaceNetworkError:
            raise
        except (ValueError, IndexError, UnicodeDecodeError) as exc:  # cut short, or not dlib's format
            raise FaceNetworkError(f"unreadable at byte {reader.position}: {exc}") from exc
        names = [name for name, _ in layers]
        try:
            self.stem, self.stem_pool = self._stem(layers[:4])
            self.blocks = self._blocks(layers[4:-2])
            (pool_name, pool), (fc_name, fc) = layers[-2:]
        except ValueError as exc:
            raise FaceNetworkError(f"not the layers of dlib's face descriptor: {names}") from exc
        # dlib writes its avg_pool_everything as a pool of side 0.
        if (pool_name, pool, fc_name) != ("avg_pool_2", _Pool(side=0, stride=1, padding=0), "fc_2") \
                or not isinstance(fc, np.ndarray):
            raise FaceNetworkError(f"the network does not end in a global pool and fc: {names[-2:]}")
        self.fc = fc

    @staticmethod
    def _layers(reader: _Reader) -> list[tuple[str, object]]:
        """Every layer from the input up, with what running it needs."""
        layers: list[tuple[str, object]] = []
        position = reader.position
        while (found := _LAYER.search(reader.data, position)) is not None:
            name = next(group for group in found.groups() if group).decode()
            reader.position = found.end()
            layers.append((name, FaceNetwork._details(name, reader)))
            if name == "fc_2":
                break
            position = reader.position
        return layers

    @staticmethod
    def _details(name: str, reader: _Reader) -> object:
        if name == "con_4":
            params = reader.tensor()
            filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
            if rows != cols or stride_y != stride_x or pad_y != pad_x:
                raise FaceNetworkError(f"a {rows}x{cols} convolution with strides {stride_y},{stride_x}")
            weights = params[:-filters].reshape(filters, -1)  # filters x (channels, rows, cols)
            channels = weights.shape[1] // (rows * cols)
            # To (rows, cols, channels) x filters: the order the unfolded image rows have.
            weights = weights.reshape(filters, channels, rows, cols).transpose(2, 3, 1, 0).reshape(-1, filters)
            return _Conv(weights=np.ascontiguousarray(weights), bias=params[-filters:].copy(),
                         side=rows, stride=stride_y, padding=pad_y)
        if name == "affine_":
            params = reader.tensor()
            half = params.size // 2
            return params[:half], params[half:]
        if name in ("max_pool_2", "avg_pool_2"):
            rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
            return _Pool(side=rows, stride=stride_y, padding=pad_y)
        if name == "fc_2":
            outputs, inputs = reader.integer(), reader.integer()
            return reader.tensor().reshape(inputs, outputs).copy()
        return None  # relu_, add_prev_: nothing to read

    @staticmethod
    def _fold(conv: object, affine: object) -> _Conv:
        if not isinstance(conv, _Conv) or not isinstance(affine, tuple):
            raise ValueError("a convolution must be followed by its affine layer")
        gamma, beta = affine
        if gamma.shape != conv.bias.shape:
            raise ValueError(f"an affine layer of {gamma.size} channels after {conv.bias.size} filters")
        return _Conv(weights=conv.weights * gamma, bias=conv.bias * gamma + beta,
                     side=conv.side, stride=conv.stride, padding=conv.padding)

    def _stem(self, layers: list[tuple[str, object]]) -> tuple[_Conv, _Pool]:
        names = [name for name, _ in layers]
        pool = layers[3][1] if len(layers) == 4 else None
        if names != ["con_4", "affine_", "relu_", "max_pool_2"] or not isinstance(pool, _Pool) or pool.padding:
            raise ValueError(names)
        return self._fold(layers[0][1], layers[1][1]), pool

    def _blocks(self, layers: list[tuple[str, object]]) -> list[_Block]:
        blocks = []
        plain = ["con_4", "affine_", "relu_", "con_4", "affine_", "add_prev_", "relu_"]
        down = ["con_4", "affine_", "relu_", "con_4", "affine_", "avg_pool_2", "add_prev_", "relu_"]
        index = 0
        while index < len(layers):
            names = [name for name, _ in layers[index:index + 8]]
            size = 8 if names == down else 7 if names[:7] == plain else 0
            if not size:
                raise ValueError(names)
            if size == 8 and layers[index + 5][1] != _Pool(side=2, stride=2, padding=0):
                raise ValueError(f"a block's pool is {layers[index + 5][1]}, not 2x2 /2")
            blocks.append(_Block(first=self._fold(layers[index][1], layers[index + 1][1]),
                                 second=self._fold(layers[index + 3][1], layers[index + 4][1]),
                                 downsample=size == 8))
            index += size
        return blocks

    def describe(self, chips: np.ndarray) -> np.ndarray:
        """128-D descriptors of ``chips`` (N x 150 x 150 x 3, uint8 RGB): N x 128 float32."""
        if chips.ndim != 4 or chips.shape[1:] != (INPUT_SIDE, INPUT_SIDE, 3):
            raise ValueError(f"face chips must be N x {INPUT_SIDE} x {INPUT_SIDE} x 3, not {chips.shape}")
        x = (chips.astype(np.float32) - self.means) / 256.0
        x = np.maximum(_convolve(x, self.stem), 0.0)
        x = _max_pool(x, self.stem_pool)
        for block in self.blocks:
            y = np.maximum(_convolve(x, block.first), 0.0)
            y = _convolve(y, block.second)
            skip = _average_pool(x) if block.downsample else x
            x = np.maximum(_add_padded(y, skip), 0.0)
        pooled = x.mean(axis=(1, 2))
        return pooled @ self.fc


def _convolve(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """N x H x W x C -> N x H' x W' x filters, as one matrix product over the unfolded image."""
    if conv.padding:
        p = conv.padding
        x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    count, height, width, channels = x.shape
    side, stride = conv.side, conv.stride
    out_h, out_w = (height - side) // stride + 1, (width - side) // stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (side, side), axis=(1, 2))  # N,H',W',C,r,c
    windows = windows[:, :out_h * stride:stride, :out_w * stride:stride]
    rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(count * out_h * out_w, side * side * channels)
    return (rows @ conv.weights + conv.bias).reshape(count, out_h, out_w, -1)


def _max_pool(x: np.ndarray, pool: _Pool) -> np.ndarray:
    count, height, width, channels = x.shape
    out_h, out_w = (height - pool.side) // pool.stride + 1, (width - pool.side) // pool.stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (pool.side, pool.side), axis=(1, 2))
    return windows[:, :out_h * pool.stride:pool.stride, :out_w * pool.stride:pool.stride].max(axis=(4, 5))


def _average_pool(x: np.ndarray) -> np.ndarray:
    """2x2 average with stride 2 (the blocks' skip path), dropping an odd last row and column."""
    count, height, width, channels = x.shape
    h, w = height // 2 * 2, width // 2 * 2
    return x[:, :h, :w].reshape(count, h // 2, 2, w // 2, 2, channels).mean(axis=(2, 4))


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b where either may be smaller (rows, columns, channels): the missing part counts as zero."""
    if a.shape == b.shape:
        return a + b
    shape = tuple(max(i, j) for i, j in zip(a.shape, b.shape, strict=True))
    total = np.zeros(shape, dtype=np.float32)
    total[:, :a.shape[1], :a.shape[2], :a.shape[3]] += a
    total[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b
    return total
