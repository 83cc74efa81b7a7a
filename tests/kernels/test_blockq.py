"""The block-quantized kernels (kernels/csrc/qmatmul.c): every instruction-set variant this CPU can run,
against torch references; the variants it cannot run are skipped with the instruction set named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgellm.kernels import blockq, native
from edgellm.kernels.blocklinear import BlockQEmbedding, BlockQLinear, BlockWeight

ISAS = {0: "avx2", 1: "avx_vnni", 2: "avx512_vnni"}


@pytest.fixture(scope="module")
def kernels():
    from edgellm.kernels import cpu

    if native._compiler() is None or native.os.environ.get("EDGELLM_NATIVE", "1") == "0" or not cpu.has("avx2"):
        pytest.skip("qmatmul C kernel unavailable: no C compiler, EDGELLM_NATIVE=0 or no AVX2")
    # it builds wherever a compiler and AVX2 are: a kernel that fails its self-check must fail here, not skip
    assert blockq.available(), native.reasons.get("qmatmul")


def random_weight(bits: int, n: int, k: int, seed: int = 0) -> BlockWeight:
    g = torch.Generator().manual_seed(seed)
    nb = k // blockq.QK
    d = torch.rand(n, nb, generator=g) * 0.02 + 0.001
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        qs, dm = blockq.pack_q4(blockq.ggml_nibbles(q), d, -8 * d + 0.01 * torch.randn(n, nb, generator=g))
    else:
        qs, dm = blockq.pack_q8(torch.randint(-128, 128, (n, nb, blockq.QK), dtype=torch.int8, generator=g), d)
    return BlockWeight(bits, qs, dm, n, k)


def isa_param(isa: int):
    return pytest.param(isa, id=ISAS[isa])


@pytest.fixture(params=[isa_param(i) for i in ISAS])
def isa(request, kernels) -> int:
    if request.param not in blockq.runnable_isas():
        pytest.skip(f"this CPU (or EDGELLM_ISA) does not allow {ISAS[request.param]}")
    return request.param


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 37, 96), (3, 64, 576), (31, 256, 1536), (1, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qmatmul_matches_the_int8_activation_reference(isa, bits, m, n, k, dtype):
    w = random_weight(bits, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = blockq.qmatmul(x, w.qs, w.dm, bits, n, isa)
    assert got.dtype == dtype and got.shape == (m, n)
    ref = blockq.qmatmul_reference(x, w.qs, w.dm, bits, n)           # the same int8 rounding, in torch
    exact = (x.float() @ w.dequantize().T)                            # the float product it approximates
    scale = exact.abs().max().item()
    tol = 2e-5 if dtype == torch.float32 else 8e-3                    # float summation order; bf16 output
    assert (got.float() - ref.float()).abs().max().item() <= tol * scale
    assert 0 < (got.float() - exact).abs().max().item() <= 0.02 * scale


def test_every_variant_gives_the_same_answer(kernels):
    isas = blockq.runnable_isas()
    w = random_weight(4, 64, 256)
    x = torch.randn(2, 256)
    outs = [blockq.qmatmul(x, w.qs, w.dm, 4, 64, i) for i in isas]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_the_rows_beside_it(isa, bits):
    """Speculative verification and batched serving rest on it: a row's result is the same bits alone or among
    other rows (the AVX512-VNNI Q4 path takes rows four at a time, sharing the weight unpacking)."""
    w = random_weight(bits, 68, 576)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(3)).bfloat16()
    together = blockq.qmatmul(x, w.qs, w.dm, bits, 68, isa)
    for m in range(11):
        assert torch.equal(blockq.qmatmul(x[m:m + 1], w.qs, w.dm, bits, 68, isa)[0], together[m]), m


def test_thread_count_does_not_change_results(kernels):
    w = random_weight(4, 512, 576)
    x = torch.randn(1, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = blockq.qmatmul(x, w.qs, w.dm, 4, 512)
        torch.set_num_threads(max(2, before))
        many = blockq.qmatmul(x, w.qs, w.dm, 4, 512)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_c_dequantization_is_exact(isa, bits, dtype, monkeypatch):
    """Every variant (isa 2 dequantizes on zmm, the others on ymm) gives the exact weights, rounded once."""
    monkeypatch.setattr(blockq.cpu, "int8_dot_isa", lambda: isa)
    w = random_weight(bits, 70, 128)
    w.dm[0, 0].fill_(7.5)  # d * q + m lands between bf16 values: the rounding step is exercised
    for n0, n1 in ((0, 70), (4, 9), (64, 70)):
        assert torch.equal(blockq.dequantize_rows(bits, w.qs, w.dm, 128, n0, n1, dtype),
                           blockq.dequantize_rows_torch(bits, w.qs, w.dm, n0, n1, dtype))
    big = random_weight(bits, 256, 576)  # enough elements for the threaded pass
    assert torch.equal(blockq.dequantize_rows(bits, big.qs, big.dm, 576, 0, 256, dtype),
                       blockq.dequantize_rows_torch(bits, big.qs, big.dm, 0, 256, dtype))


def test_q4_layout_is_ggml_order():
    """Byte j of a block holds element j (low nibble) and j + 16 (high nibble); w = d * q + m."""
    q = torch.arange(32, dtype=torch.uint8)[None] % 16                # (1, 32)
    d, m = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    qs, dm = blockq.pack_q4(blockq.ggml_nibbles(q), d, m)
    assert qs.shape == (1, 1, 4, 16) and dm.shape == (1, 1, 2, 4)    # padded to 4 rows
    assert qs[0, 0, 0, 1].item() == 1 | (1 << 4)                      # elements 1 and 17 (both 1)
    w = blockq.dequantize_rows_torch(4, qs, dm, 0, 1, torch.float32)
    torch.testing.assert_close(w, 0.5 * q.float() - 1.0)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_block_linear_both_paths(kernels, rows):
    w = random_weight(4, 96, 128)
    layer = BlockQLinear(w, bias=torch.randn(96))
    x = torch.randn(rows, 128)
    ref = F.linear(x, w.dequantize(), layer.bias)
    got = layer(x)
    scale = ref.abs().max().item()
    if rows >= BlockQLinear.DENSE_FROM_ROWS:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)   # exact weight, dense GEMM
    else:
        assert 0 < (got - ref).abs().max().item() <= 0.02 * scale     # int8 activations
    layer.dense_chunk_elems = 128 * 8                                 # several chunks: same answer
    torch.testing.assert_close(layer._forward_dense(x), F.linear(x, w.dequantize()), rtol=1e-5, atol=1e-5)


def test_block_linear_without_the_c_kernel_uses_torch(monkeypatch):
    w = random_weight(8, 20, 64)
    monkeypatch.setattr(blockq, "available", lambda: False)
    layer = BlockQLinear(w)
    assert layer.isa == -1
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, w.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_block_embedding_looks_up_exact_rows(bits):
    w = random_weight(bits, 50, 64)
    emb = BlockQEmbedding(w, torch.float32)
    ids = torch.tensor([[0, 3, 4, 49], [7, 7, 1, 2]])
    assert torch.equal(emb(ids), w.dequantize()[ids])


def test_qmatmul_compiles_as_one_opaque_op(kernels):
    w = random_weight(4, 32, 64)
    x = torch.randn(1, 64)
    isa = blockq.runnable_isas()[0]
    fn = torch.compile(lambda a: torch.relu(blockq.qmatmul(a, w.qs, w.dm, 4, 32, isa)), backend="eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(x), torch.relu(blockq.qmatmul(x, w.qs, w.dm, 4, 32, isa)))


def test_dense_path_keeps_gradients_right(kernels):
    """The prefill path reuses one scratch buffer for dequantized weights, except when autograd needs them."""
    a, b = BlockQLinear(random_weight(4, 64, 64, seed=1)), BlockQLinear(random_weight(4, 64, 64, seed=2))
    x = torch.randn(40, 64, requires_grad=True)
    b(a(x)).sum().backward()
    wa, wb = a.dequantized_weight(), b.dequantized_weight()
    xr = x.detach().clone().requires_grad_()
    F.linear(F.linear(xr, wa), wb).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
