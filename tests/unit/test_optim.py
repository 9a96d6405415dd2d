"""The agent's optimizer: torch.optim.SGD's update bit for bit, without torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fedmpq.models import build_model
from fedmpq.optim import MomentumSGD


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_same_update_as_torch_sgd(momentum: float) -> None:
    torch.manual_seed(0)
    ours = build_model("cnn", 10, (1, 28, 28))
    theirs = build_model("cnn", 10, (1, 28, 28))
    theirs.load_state_dict(ours.state_dict())
    next(ours.parameters()).requires_grad_(False)  # a frozen parameter is left alone
    next(theirs.parameters()).requires_grad_(False)
    opt_ours = MomentumSGD(ours.parameters(), lr=0.05, momentum=momentum)
    opt_theirs = torch.optim.SGD(
        [p for p in theirs.parameters() if p.requires_grad], lr=0.05, momentum=momentum
    )
    for step in range(4):
        x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(step))
        y = torch.arange(8) % 10
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    if momentum:
        p = next(p for p in ours.parameters() if p.requires_grad)
        q = next(p for p in theirs.parameters() if p.requires_grad)
        assert torch.equal(
            opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"]
        )


def test_local_training_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch\n"
        "from edge_client.training import train_local\n"
        "from fedmpq.models import build_model, quantizable_layers\n"
        "m = build_model('cnn', 10, (1, 28, 28))\n"
        "x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10\n"
        "train_local(m, x, y, dict.fromkeys(quantizable_layers(m), 4), scheme='symmetric',\n"
        "            per_channel=True, epochs=1, batch_size=8, learning_rate=0.05)\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
