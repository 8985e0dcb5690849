"""A small CNN for scikit-learn's bundled 8x8 handwritten digits (`load_digits`).

The dataset ships with scikit-learn, so training needs no download. Each image is 8x8 with
integer intensities 0..16, ink high (each pixel counts the set pixels of a 4x4 block of the
original 32x32 bitmap).

Contract of the exported network (written into signature.json):

- input ``pixels``: float32 ``[N, 1, 8, 8]``, dataset intensity divided by 16 (so 0..1, ink high);
- output ``probabilities``: float32 ``[N, 10]``, softmax over the classes, labels ``"0".."9"``.

The held-out split is fixed (``SPLIT_SEED``) so that models trained with different ``--seed``
values are scored on the same images; the seed changes initialisation and batch order only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LABELS: tuple[str, ...] = tuple(str(i) for i in range(10))
PIXEL_SCALE = 16.0  # dataset intensities are 0..16; the network sees intensity / 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 25
BATCH_SIZE = 64
LEARNING_RATE = 3e-3


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, one max-pool, two linear layers; returns logits ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, len(LABELS)),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class DigitsClassifier(nn.Module):
    """What gets exported: the trained net followed by a softmax, so every backend returns
    probabilities and the handler only has to rank them."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(pixels), dim=1)


@dataclass(frozen=True)
class DigitsData:
    """The fixed train/test split, as network inputs (``[N, 1, 8, 8]`` float32, 0..1)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainResult:
    model: DigitsClassifier
    accuracy: float
    seed: int
    n_train: int
    n_test: int


def to_network_input(raw: np.ndarray) -> np.ndarray:
    """Dataset intensities (0..16, any shape holding N*64 values) -> ``[N, 1, 8, 8]`` float32."""
    return (np.asarray(raw, dtype=np.float32) / PIXEL_SCALE).reshape(-1, 1, 8, 8)


def load_data() -> DigitsData:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    return DigitsData(
        x_train=to_network_input(x_train),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=to_network_input(x_test),
        y_test=np.asarray(y_test, dtype=np.int64),
    )


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def train(seed: int = 0, data: DigitsData | None = None) -> TrainResult:
    """Train from scratch; the same seed gives the same weights.

    Training runs on one thread: the result then does not depend on the thread count of the
    process (summation order), so the exporter and a test retraining the eager model agree,
    and on a busy 2-core machine one thread is also the faster choice for a model this small.
    """
    data = data or load_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _fit(seed, data)
    finally:
        torch.set_num_threads(threads)
    model = DigitsClassifier(net).eval()
    return TrainResult(
        model=model,
        accuracy=accuracy(model, data.x_test, data.y_test),
        seed=seed,
        n_train=len(data.x_train),
        n_test=len(data.x_test),
    )


def _fit(seed: int, data: DigitsData) -> DigitsNet:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = DigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return net


def sample_inputs(batch_size: int, data: DigitsData | None = None) -> dict[str, np.ndarray]:
    """The first ``batch_size`` held-out images, keyed by the network's input name."""
    data = data or load_data()
    return {"pixels": np.ascontiguousarray(data.x_test[:batch_size])}
