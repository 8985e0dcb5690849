"""Training the digits CNN: accurate, fast, deterministic per seed."""

from __future__ import annotations

import numpy as np
import torch

from export.models import digits


def test_trains_above_95_percent_and_seeds_differ() -> None:
    data = digits.load_data()
    first = digits.train(0, data)
    second = digits.train(1, data)
    assert first.accuracy >= 0.95
    assert second.accuracy >= 0.95
    assert (first.n_train, first.n_test) == (1437, 360)
    x = torch.from_numpy(data.x_test[:8])
    with torch.inference_mode():
        p1, p2 = first.model(x), second.model(x)
    assert not torch.equal(p1, p2)  # another seed, another model
    np.testing.assert_allclose(p1.sum(dim=1).numpy(), 1.0, atol=1e-5)  # softmax included


def test_same_seed_same_model() -> None:
    data = digits.load_data()
    a, b = digits.train(3, data), digits.train(3, data)
    assert a.accuracy == b.accuracy
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_network_input_is_dataset_units_over_16() -> None:
    raw = np.arange(64, dtype=np.float32) % 17
    x = digits.to_network_input(raw)
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    assert float(x.max()) == 1.0
