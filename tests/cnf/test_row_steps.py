"""Per-row time in the exact-trace kernel and the per-row solve of a CNF block."""
import pytest
import torch
from torch.func import jacrev, vmap

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.cnf.trace_kernel import _get_packed, trace_rows_kernel
from fastcnf.ode import SolverConfig


@pytest.mark.parametrize("act,hidden", [("tanh", (16, 8, 16)), ("softplus", (16, 8, 16)), ("tanh", (16,)),
                                        ("tanh", (16, 8)), ("softplus", (8, 16, 8, 16))])
def test_per_row_kernel_equals_the_network_and_its_brute_force_trace(act, hidden):
    # every depth: one hidden layer (one folded product), two (the first and last folds meet), three
    # and four (scaled tangents between them)
    torch.manual_seed(0)
    net = ConcatSquashMLP(4, hidden, act).double()
    z = torch.randn(7, 4, dtype=torch.float64)
    t = torch.rand(7, dtype=torch.float64)
    with torch.no_grad():
        f, trace = trace_rows_kernel(_get_packed(net), t, z)
        f_one, trace_one = trace_rows_kernel(_get_packed(net), t[2], z)  # one time for every row
    for i in range(7):
        fi = net(t[i], z[i:i + 1])
        jac = jacrev(lambda v: net(t[i], v.unsqueeze(0))[0])(z[i])
        torch.testing.assert_close(f[i], fi[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(trace[i], torch.trace(jac), rtol=1e-12, atol=1e-12)
        jac_one = jacrev(lambda v: net(t[2], v.unsqueeze(0))[0])(z[i])
        torch.testing.assert_close(f_one[i], net(t[2], z[i:i + 1])[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(trace_one[i], torch.trace(jac_one), rtol=1e-12, atol=1e-12)


def test_block_per_row_solve_matches_a_tight_reference_and_one_row_solves():
    torch.manual_seed(2)
    net = ConcatSquashMLP(3, (16, 16), "tanh").double()
    block = CNFBlock(net, ExactTrace(), SolverConfig(method="dopri5", atol=1e-6, rtol=1e-6)).eval()
    tight = CNFBlock(net, ExactTrace(), SolverConfig(method="dopri5", atol=1e-11, rtol=1e-11)).eval()
    x = 2 * torch.randn(9, 3, dtype=torch.float64)
    with torch.no_grad():
        z_ref, l_ref = tight(x)
        block.row_steps = True
        z, logdet = block(x)
        rows = [block(x[i:i + 1]) for i in range(9)]
    assert (z - z_ref).abs().max() < 1e-4 and (logdet - l_ref).abs().max() < 1e-4
    torch.testing.assert_close(torch.cat([r[0] for r in rows]), z, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[1] for r in rows]), logdet, rtol=0, atol=1e-12)
    with torch.enable_grad():  # with gradients the block keeps its batch solve
        z_grad, _ = block(x.requires_grad_())
    assert z_grad.requires_grad
