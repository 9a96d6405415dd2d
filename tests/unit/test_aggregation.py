import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import StreamingAverage


@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.integers(1, 1000), min_size=1, max_size=20),
    seed=st.integers(0, 2**31 - 1),
)
def test_streaming_mean_equals_batch_weighted_mean(weights, seed):
    rng = np.random.default_rng(seed)
    updates = [
        {
            "a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
        }
        for _ in weights
    ]
    agg = StreamingAverage(updates[0])
    for update, weight in zip(updates, weights, strict=True):
        agg.add(update, weight)
    mean = agg.mean()
    for name in ("a", "b"):
        expected = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)
        assert mean[name].dtype == np.float32
    assert agg.count == len(weights)


def test_mean_of_nothing_is_an_error():
    agg = StreamingAverage({"a": np.zeros(2, np.float32)})
    try:
        agg.mean()
    except ValueError as exc:
        assert "no update" in str(exc)
    else:
        raise AssertionError("mean() of no updates must raise")


def test_start_error_re_bases_an_untrained_client_on_the_global_weights():
    from coordinator.aggregation import start_error
    from fedmpq.quant import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    for observer in ("minmax", "mse"):
        sent = dequantize(quantize(w, 2, axis=0, observer=observer))  # trained nothing
        error = start_error(w, 2, "symmetric", True, observer)
        np.testing.assert_allclose(sent + error, w, atol=1e-6)
        assert float(np.abs(error).max()) > 0.1  # two bits lose a lot: that is the point
