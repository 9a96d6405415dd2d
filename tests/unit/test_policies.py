import pytest

from fedmpq.errors import ConfigError
from fedmpq.policies import LayerInfo, make_policy, parse_policy, policy_names
from fedmpq.policies.base import BitAllocation, ClientInfo
from fedmpq.wire.messages import DeviceProfile

LAYERS = [LayerInfo("conv.weight", 100), LayerInfo("fc.weight", 300)]
PROFILE = DeviceProfile(2**30, 2**29, 4, 1500.0, 0.1, 10.0, "linux", "aarch64")


def clients(n):
    return [ClientInfo(f"d{i}", PROFILE, 10) for i in range(n)]


def test_registry_lists_shipped_policies():
    assert {"float32", "fixed"} <= set(policy_names())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fixed_policy_assigns_uniform_bits(bits):
    policy = make_policy("fixed", bits=bits)
    policy.setup(LAYERS)
    allocation = policy.allocate(1, clients(3))
    assert set(allocation) == {"d0", "d1", "d2"}
    for a in allocation.values():
        assert a.bits == {"conv.weight": bits, "fc.weight": bits}


def test_float32_policy_assigns_32_bits():
    policy = make_policy("float32")
    policy.setup(LAYERS)
    assert policy.allocate(1, clients(1))["d0"].average_bits(LAYERS) == 32


def test_average_bits_is_parameter_weighted():
    a = BitAllocation({"conv.weight": 8, "fc.weight": 2})
    assert a.average_bits(LAYERS) == pytest.approx((8 * 100 + 2 * 300) / 400)


@pytest.mark.parametrize(
    "spec,expected", [("float32", ("float32", {})), ("fixed:3", ("fixed", {"bits": 3}))]
)
def test_parse_policy(spec, expected):
    assert parse_policy(spec) == expected


def test_bad_policy_names_and_params_are_config_errors():
    with pytest.raises(ConfigError, match="known policies"):
        make_policy("nope")
    with pytest.raises(ConfigError, match=r"bits must be 1\.\.8"):
        make_policy("fixed", bits=9)
    with pytest.raises(ConfigError, match="does not take"):
        make_policy("fixed", colour="red")
    with pytest.raises(ConfigError, match="NAME:BITS"):
        parse_policy("fixed:four")
