"""Secure aggregation: exact sums with and without dropouts, masks that hide, Shamir, grid, ring."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpq.errors import DecodeError
from fedmpq.secagg import (
    DeviceSession,
    Dropouts,
    LayerGrid,
    SecAggError,
    SecAggSetup,
    SecureAggregation,
    default_threshold,
    grid_codes,
    lift,
    ring_bits,
    shamir,
    simulate_round,
)
from fedmpq.secagg.messages import KeyRoster, ShareKeys, UnmaskRequest
from fedmpq.secagg.ring import (
    dequantize_sum,
    from_ring,
    max_code,
    pack_ring,
    ring_mask,
    ring_nbytes,
    to_ring,
    unpack_ring,
    word_dtype,
)

LAYERS = [
    LayerGrid("conv", 300, 4, 0.25),
    LayerGrid("fc", 41, 8, 1.5),
    LayerGrid("empty", 0, 2, 1.0),
]


def _ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def _inputs(ids: list[str], layers: list[LayerGrid], seed: int):
    """Random mixed-precision codes: each device at 1..B bits per layer."""
    rng = np.random.default_rng(seed)
    bits = {c: {g.name: int(rng.integers(1, g.bits + 1)) for g in layers} for c in ids}
    codes = {
        c: {
            g.name: grid_codes(rng.standard_normal(g.size) * g.scale, g.scale, bits[c][g.name])
            for g in layers
        }
        for c in ids
    }
    return codes, bits


def _plain_sum(codes, bits, layers, who) -> dict[str, np.ndarray]:
    return {
        g.name: sum(
            (lift(codes[c][g.name], bits[c][g.name], g.bits) for c in who),
            np.zeros(g.size, dtype=np.int64),
        )
        for g in layers
    }


def _assert_exact(result, codes, bits, layers, who) -> None:
    assert set(result.contributors) == set(who)
    expected = _plain_sum(codes, bits, layers, who)
    for g in layers:
        assert result.codes[g.name].dtype == np.int64
        np.testing.assert_array_equal(result.codes[g.name], expected[g.name])


# -- the secure sum is the plain integer sum, bit for bit ---------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 8),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_secure_sum_equals_plain_sum_with_up_to_n_minus_t_dropouts(n, data, seed):
    ids = _ids(n)
    t = data.draw(st.integers(2, n), label="threshold")
    order = data.draw(st.permutations(ids), label="who drops first")
    k_share = data.draw(st.integers(0, n - t), label="drop before sharing")
    k_send = data.draw(st.integers(0, n - t - k_share), label="drop before sending")
    k_after = data.draw(st.integers(0, n - t - k_share - k_send), label="drop after sending")
    drops = Dropouts(
        before_sharing=frozenset(order[:k_share]),
        before_sending=frozenset(order[k_share : k_share + k_send]),
        after_sending=frozenset(order[k_share + k_send : k_share + k_send + k_after]),
    )
    codes, bits = _inputs(ids, LAYERS, seed)
    result = simulate_round(SecAggSetup("run", 7, ids, t, LAYERS), codes, bits, drops)
    arrived = [c for c in ids if c not in drops.before_sharing | drops.before_sending]
    _assert_exact(result, codes, bits, LAYERS, arrived)


@pytest.mark.parametrize(
    "drops",
    [
        Dropouts(),
        Dropouts(after_sending=frozenset(_ids(10)[:4])),  # inputs count, self masks recovered
        Dropouts(before_sending=frozenset(_ids(10)[6:])),  # excluded, pairwise masks recovered
        Dropouts(
            before_sharing=frozenset({"dev-01"}),
            before_sending=frozenset({"dev-04", "dev-09"}),
            after_sending=frozenset({"dev-06"}),
        ),
    ],
)
def test_ten_devices_with_n_minus_t_dropouts_of_each_kind(drops):
    ids = _ids(10)
    codes, bits = _inputs(ids, LAYERS, seed=3)
    setup = SecAggSetup("run", 1, ids, default_threshold(10), LAYERS)
    result = simulate_round(setup, codes, bits, drops)
    arrived = [c for c in ids if c not in drops.before_sharing | drops.before_sending]
    _assert_exact(result, codes, bits, LAYERS, arrived)
    # de-quantizing the sum gives the sum of what each device's codes stand for
    floats = result.dequantized(setup)
    for g in LAYERS:
        each = [dequantize_sum(codes[c][g.name], g.scale, bits[c][g.name]) for c in arrived]
        np.testing.assert_allclose(floats[g.name], np.sum(each, axis=0))


@pytest.mark.parametrize("step", ["before_sharing", "before_sending", "after_sending"])
def test_more_than_n_minus_t_dropouts_stop_the_round(step):
    ids = _ids(5)
    codes, bits = _inputs(ids, LAYERS, seed=1)
    drops = Dropouts(**{step: frozenset(ids[:3])})
    with pytest.raises(SecAggError, match="threshold"):
        simulate_round(SecAggSetup("run", 1, ids, 3, LAYERS), codes, bits, drops)


# -- a masked update on its own is noise ---------------------------------------------------


def test_a_single_masked_update_is_uncorrelated_with_the_update():
    size = 1 << 20  # correlation of independent vectors has std 1/sqrt(size) = 0.001
    layers = [LayerGrid("w", size, 4, 1.0)]
    ids = _ids(3)
    setup = SecAggSetup("run", 1, ids, 2, layers)
    rng = np.random.default_rng(0)
    # a strongly structured update: a smooth ramp plus noise, using the whole 4-bit range
    true = grid_codes(np.sin(np.arange(size) / 500.0) + 0.1 * rng.standard_normal(size), 1.0, 4)
    server = SecureAggregation(setup)
    devices = [DeviceSession(c, setup) for c in ids]
    for d in devices:
        server.add_keys(d.advertise())
    roster = server.roster()
    for d in devices:
        server.add_shares(d.share_keys(roster))
    inbox = {f.client_id: f for f in server.forward_shares()}
    masked = devices[0].masked_input(inbox[ids[0]], {"w": true}, {"w": 4})
    (tensor,) = masked.tensors
    assert tensor.ring_bits == ring_bits(4, 3) == 6
    seen = from_ring(unpack_ring(tensor.data, tensor.ring_bits, size), tensor.ring_bits)
    corr = np.corrcoef(seen.astype(np.float64), true.astype(np.float64))[0, 1]
    assert abs(corr) < 0.01
    # and it is spread over the whole ring, not just the update's range
    assert seen.min() == -32 and seen.max() == 31


# -- Shamir ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=shamir.MAX_SECRET_BYTES),
    n=st.integers(2, 12),
    data=st.data(),
)
def test_shamir_needs_exactly_t_shares(secret, n, data):
    t = data.draw(st.integers(2, n))
    indices = data.draw(st.permutations(range(1, n + 1)))
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    chosen = {x: shares[x] for x in indices[:t]}
    assert shamir.combine(chosen, t, len(secret)) == secret
    fewer = {x: shares[x] for x in indices[: t - 1]}
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.combine(fewer, t, len(secret))
    # interpolating t - 1 shares anyway lands on a field element unrelated to the secret
    guess = shamir.interpolate_at_zero((x, shamir.decode_share(y)) for x, y in fewer.items())
    assert guess != int.from_bytes(secret, "big")


def test_shamir_rejects_bad_shares_and_secrets():
    with pytest.raises(DecodeError):
        shamir.decode_share(b"\x00" * (shamir.SHARE_BYTES - 1))
    with pytest.raises(DecodeError):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)  # above the prime
    with pytest.raises(SecAggError):
        shamir.split(b"x" * (shamir.MAX_SECRET_BYTES + 1), 2, [1, 2])
    with pytest.raises(SecAggError):
        shamir.split(b"x", 2, [1, 1, 2])


# -- the grid -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=50),
    scale=st.floats(1e-3, 1e3),
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_grid_codes_lift_exactly_onto_the_finer_grid(values, scale, bits, data):
    grid = data.draw(st.integers(bits, 8), label="grid bits")
    x = np.array(values) * scale
    codes = grid_codes(x, scale, bits)
    top = max_code(bits)
    assert np.all(np.abs(codes) <= top)
    lifted = lift(codes, bits, grid)
    # the same value on both grids, as exact integers: c_b * 2**(B-b)
    np.testing.assert_array_equal(lifted, codes.astype(np.int64) * 2 ** (grid - bits))
    assert np.all(np.abs(lifted) <= 2 ** (grid - 1))
    # and as floats (power-of-two steps: no rounding)
    np.testing.assert_array_equal(
        dequantize_sum(lifted, scale, grid), dequantize_sum(codes, scale, bits)
    )
    # the coarse grid is a subset of the fine one: re-quantizing its values is exact
    on_grid = dequantize_sum(codes, scale, bits)
    np.testing.assert_array_equal(grid_codes(on_grid, scale, grid), lifted)


def test_grid_codes_round_to_nearest_and_clip():
    np.testing.assert_array_equal(
        grid_codes(np.array([0.0, 0.24, 0.26, -0.74, 0.99, -5.0]), 1.0, 3), [0, 1, 1, -3, 4, -4]
    )
    np.testing.assert_array_equal(
        grid_codes(np.array([-0.6, -0.4, 0.4, 0.6]), 1.0, 1), [-1, 0, 0, 1]
    )


def test_lift_rejects_codes_that_do_not_fit():
    with pytest.raises(SecAggError):
        lift(np.array([9]), 4, 8)  # a 4-bit grid stops at +-8 (+-scale)
    with pytest.raises(SecAggError):
        lift(np.array([-2]), 1, 4)
    with pytest.raises(SecAggError):
        lift(np.array([1]), 5, 4)  # finer than the grid


# -- the ring --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(grid=st.integers(1, 8), n=st.integers(1, 5000), data=st.data())
def test_extreme_sums_never_overflow_the_ring(grid, n, data):
    k = ring_bits(grid, n)
    assert k <= grid + math.ceil(math.log2(n)) + 1  # never above the brief's bound
    bits = data.draw(st.integers(1, grid), label="device bits")
    sign = data.draw(st.sampled_from([-1, 1]), label="sign")
    extreme = lift(np.array([sign * max_code(bits)]), bits, grid)
    # n copies added in the ring's words, wrapping as the coordinator's running sum does
    dtype = word_dtype(k)
    words = np.add.reduce(np.full(n, to_ring(extreme, dtype)[0]), dtype=dtype, keepdims=True)
    assert from_ring(words, k)[0] == n * int(extreme[0])
    # k is the smallest such ring: n codes at +scale need all of it
    top = n * 2 ** (grid - 1)
    assert top < 2 ** (k - 1) and top >= 2 ** (k - 2)


def test_four_bit_codes_from_ten_devices_use_an_eight_bit_ring():
    assert ring_bits(4, 10) == 8
    assert ring_nbytes(1000, 8) == 1000


@settings(max_examples=100, deadline=None)
@given(k=st.integers(1, 32), count=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_ring_packing_round_trips_at_k_bits(k, count, seed):
    words = np.random.default_rng(seed).integers(0, 2**32, size=count, dtype=np.uint64)
    words = (words & ring_mask(k)).astype(word_dtype(k))
    data = pack_ring(words, k)
    assert len(data) == ring_nbytes(count, k)
    assert len(data) <= math.ceil(count * k / 8) + 1
    np.testing.assert_array_equal(unpack_ring(data, k, count), words)
    with pytest.raises(DecodeError):
        unpack_ring(data + b"\x00", k, count)


# -- the protocol refuses what would leak or corrupt ------------------------------------------


def _started(n=4, t=3):
    ids = _ids(n)
    setup = SecAggSetup("run", 2, ids, t, LAYERS)
    server = SecureAggregation(setup)
    devices = {c: DeviceSession(c, setup) for c in ids}
    for d in devices.values():
        server.add_keys(d.advertise())
    roster = server.roster()
    for d in devices.values():
        server.add_shares(d.share_keys(roster))
    return setup, server, devices


def _masked(setup, server, devices):
    codes, bits = _inputs(list(devices), LAYERS, seed=5)
    inputs = {
        f.client_id: devices[f.client_id].masked_input(f, codes[f.client_id], bits[f.client_id])
        for f in server.forward_shares()
    }
    return codes, bits, inputs


def test_a_device_never_reveals_both_secrets_of_one_device():
    setup, server, devices = _started()
    _, _, inputs = _masked(setup, server, devices)
    ids = list(devices)
    honest = _request(setup, ids, [])
    greedy = replace(honest, dropped=[ids[1]])
    with pytest.raises(SecAggError, match="both secrets"):
        devices[ids[0]].unmask(greedy)
    with pytest.raises(SecAggError, match="threshold"):
        devices[ids[0]].unmask(_request(setup, ids[:2], ids[2:]))
    answer = devices[ids[0]].unmask(honest)
    assert [s.owner for s in answer.self_mask_shares] == ids and not answer.mask_key_shares
    assert devices[ids[0]].unmask(_request(setup, ids, [])) == answer  # a re-sent request
    with pytest.raises(SecAggError, match="different request"):
        devices[ids[0]].unmask(_request(setup, ids[:3], ids[3:]))
    assert inputs  # the masked inputs existed: the refusals came after masking


def _request(setup, survivors, dropped):
    return UnmaskRequest(setup.run_id, setup.round, list(survivors), list(dropped))


def test_the_coordinator_rejects_strays_and_keeps_its_sum():
    setup, server, devices = _started()
    codes, bits, inputs = _masked(setup, server, devices)
    ids = list(devices)
    first = inputs[ids[0]]
    server.add_masked_input(first)
    with pytest.raises(SecAggError, match="already sent"):
        server.add_masked_input(first)
    with pytest.raises(SecAggError, match="round"):
        server.add_masked_input(replace(inputs[ids[1]], round=3))
    short = replace(
        inputs[ids[1]],
        tensors=[
            replace(inputs[ids[1]].tensors[0], data=inputs[ids[1]].tensors[0].data[:-1]),
            *inputs[ids[1]].tensors[1:],
        ],
    )
    with pytest.raises(DecodeError):
        server.add_masked_input(short)
    for c in ids[1:]:
        server.add_masked_input(inputs[c])  # the rejected copies changed nothing
    request = server.unmask_request()
    for c in request.survivors:
        server.add_unmask_response(devices[c].unmask(request))
    _assert_exact(server.result(), codes, bits, LAYERS, ids)


def test_tampered_shares_are_caught():
    ids = _ids(4)
    setup = SecAggSetup("run", 2, ids, 3, LAYERS)
    server = SecureAggregation(setup)
    devices = {c: DeviceSession(c, setup) for c in ids}
    for d in devices.values():
        server.add_keys(d.advertise())
    roster = server.roster()
    for d in devices.values():
        server.add_shares(d.share_keys(roster))
    inbox = {f.client_id: f for f in server.forward_shares()}
    victim = inbox[ids[0]]
    flipped = bytearray(victim.shares[0].ciphertext)
    flipped[0] ^= 1
    forged = replace(
        victim, shares=[replace(victim.shares[0], ciphertext=bytes(flipped)), *victim.shares[1:]]
    )
    codes, bits = _inputs(ids, LAYERS, seed=2)
    with pytest.raises(DecodeError, match="authentication"):
        devices[ids[0]].masked_input(forged, codes[ids[0]], bits[ids[0]])


def test_a_wrong_mask_key_share_is_detected():
    setup, server, devices = _started(n=4, t=3)
    _, _, inputs = _masked(setup, server, devices)
    ids = list(devices)
    for c in ids[:3]:  # ids[3] drops before sending: its mask key gets reconstructed
        server.add_masked_input(inputs[c])
    request = server.unmask_request()
    assert request.dropped == [ids[3]]
    responses = [devices[c].unmask(request) for c in request.survivors]
    bad = responses[0].mask_key_shares[0]
    wrong = (shamir.decode_share(bad.share) + 1) % shamir.PRIME
    responses[0] = replace(
        responses[0],
        mask_key_shares=[replace(bad, share=wrong.to_bytes(shamir.SHARE_BYTES, "big"))],
    )
    for r in responses:
        server.add_unmask_response(r)
    with pytest.raises(SecAggError):
        server.result()


def test_setups_that_cannot_be_secure_are_refused():
    with pytest.raises(SecAggError):
        SecureAggregation(SecAggSetup("run", 1, ["a"], 1, LAYERS))
    with pytest.raises(SecAggError):
        SecureAggregation(SecAggSetup("run", 1, ["a", "b"], 3, LAYERS))
    with pytest.raises(SecAggError):
        SecureAggregation(SecAggSetup("run", 1, ["a", "a"], 2, LAYERS))
    with pytest.raises(SecAggError):
        SecureAggregation(SecAggSetup("run", 1, ["a", "b"], 2, [LayerGrid("x", 3, 9, 1.0)]))
    with pytest.raises(SecAggError):
        DeviceSession("stranger", SecAggSetup("run", 1, ["a", "b"], 2, LAYERS))


def test_low_order_public_keys_are_rejected():
    ids = _ids(3)
    setup = SecAggSetup("run", 1, ids, 2, LAYERS)
    server = SecureAggregation(setup)
    honest = DeviceSession(ids[0], setup).advertise()
    with pytest.raises(DecodeError, match="X25519"):
        server.add_keys(replace(honest, mask_key=bytes(32)))  # the all-zero point
    with pytest.raises(DecodeError, match="X25519"):
        server.add_keys(replace(honest, cipher_key=b"short"))
    server.add_keys(honest)  # the rejected copies left no trace


def test_closing_a_step_again_gives_the_same_messages_to_resend():
    setup, server, _ = _started()
    assert server.roster() is server.roster()
    inboxes = server.forward_shares()
    assert server.forward_shares() is inboxes
    with pytest.raises(SecAggError, match="not collecting"):
        server.add_shares(ShareKeys(setup.run_id, setup.round, setup.client_ids[0], []))


@pytest.mark.parametrize("n", [2, 8, 10])
@pytest.mark.parametrize("sign", [-1, 1])
def test_extreme_codes_through_a_whole_round(n, sign):
    # at n = 8 the 4-bit layer's sum, 8 * 8 = 64, is one more than a (k-1)-bit ring holds
    ids = _ids(n)
    layers = [LayerGrid("w", 64, 4, 1.0), LayerGrid("v", 16, 8, 1.0)]
    bits = {c: {"w": 1 + i % 4, "v": 8} for i, c in enumerate(ids)}
    codes = {
        c: {g.name: np.full(g.size, sign * max_code(bits[c][g.name])) for g in layers} for c in ids
    }
    result = simulate_round(SecAggSetup("run", 1, ids, n // 2 + 1, layers), codes, bits)
    _assert_exact(result, codes, bits, layers, ids)
    assert np.all(result.codes["w"] == sign * n * 8)


def test_a_low_order_key_that_reaches_a_device_fails_its_step_cleanly():
    ids = _ids(3)
    setup = SecAggSetup("run", 1, ids, 2, LAYERS)
    devices = [DeviceSession(c, setup) for c in ids]
    keys = [d.advertise() for d in devices]
    keys[2] = replace(keys[2], cipher_key=bytes(32))
    roster = KeyRoster(setup.run_id, setup.round, keys)
    with pytest.raises(DecodeError, match="bad public key"):
        devices[0].share_keys(roster)
    # nothing was committed: the honest roster still gets an answer
    honest = KeyRoster(setup.run_id, setup.round, [d.advertise() for d in devices])
    assert len(devices[0].share_keys(honest).shares) == 2
