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


def random_weight(bits: int, n: int, k: int, seed: int = 0, lanes: int = blockq.R) -> BlockWeight:
    """A random weight packed with `lanes` rows per group (4: AVX2 / AVX-VNNI; 16: AVX512-VNNI)."""
    g = torch.Generator().manual_seed(seed)
    nb = k // blockq.QK
    d = torch.rand(n, nb, generator=g) * 0.02 + 0.001
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        qs, dm = blockq.pack_q4(blockq.ggml_nibbles(q), d, -8 * d + 0.01 * torch.randn(n, nb, generator=g), lanes)
    else:
        codes = torch.randint(-128, 128, (n, nb, blockq.QK), dtype=torch.int8, generator=g)
        qs, dm = blockq.pack_q8(codes, d, lanes)
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
    w = random_weight(bits, n, k, lanes=blockq.lanes_for(isa))
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
    x = torch.randn(2, 256)
    outs = []
    for i in isas:  # each on its own layout of the same weight
        w = random_weight(4, 64, 256, lanes=blockq.lanes_for(i))
        outs.append(blockq.qmatmul(x, w.qs, w.dm, 4, 64, i))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_the_rows_beside_it(isa, bits):
    """Speculative verification and batched serving rest on it: a row's result is the same bits alone or among
    other rows (AVX2 takes rows two at a time, AVX512-VNNI eight, sharing the weight unpacking)."""
    w = random_weight(bits, 68, 576, lanes=blockq.lanes_for(isa))
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(3)).bfloat16()
    together = blockq.qmatmul(x, w.qs, w.dm, bits, 68, isa)
    for m in range(11):
        assert torch.equal(blockq.qmatmul(x[m:m + 1], w.qs, w.dm, bits, 68, isa)[0], together[m]), m


@pytest.mark.parametrize("m", [1, 40])
def test_thread_count_does_not_change_results(kernels, m):
    w = random_weight(4, 512, 576, lanes=blockq.load_lanes())
    x = torch.randn(m, 576)
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
    """Every layout (16-row groups dequantize on zmm, 4-row groups on ymm) gives the exact weights, rounded once."""
    lanes = blockq.lanes_for(isa)
    w = random_weight(bits, 70, 128, lanes=lanes)
    w.dm[0, 0].fill_(7.5)  # d * q + m lands between bf16 values: the rounding step is exercised
    for n0, n1 in ((0, 70), (lanes, lanes + 5), (64, 70)):
        assert torch.equal(blockq.dequantize_rows(bits, w.qs, w.dm, 128, n0, n1, dtype),
                           blockq.dequantize_rows_torch(bits, w.qs, w.dm, n0, n1, dtype))
    big = random_weight(bits, 256, 576, lanes=lanes)  # enough elements for the threaded pass
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


@pytest.mark.parametrize("bits", [4, 8])
def test_16_row_layout_puts_one_row_in_each_lane(bits):
    """AVX512-VNNI's layout: chunk i of a block holds, for each of 16 rows, 4 bytes: elements 4i..4i+3 (Q4: low
    nibbles; the high nibbles hold elements 16 + 4i..); it holds the same weight as the 4-row layout."""
    g = torch.Generator().manual_seed(4)
    n, k = 21, 64
    d, m = torch.rand(n, 2, generator=g), torch.randn(n, 2, generator=g)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        (qs, dm), (qs4, dm4) = (blockq.pack_q4(blockq.ggml_nibbles(q), d, m, lanes) for lanes in (16, 4))
        assert qs.shape == (2, 2, 4, 16, 4) and dm.shape == (2, 2, 2, 16)
        assert qs[1, 1, 2, 3, 1].item() == q[19, 32 + 9].item() | (q[19, 32 + 25].item() << 4)
    else:
        q = torch.randint(-128, 128, (n, 2, 32), dtype=torch.int8, generator=g)
        (qs, dm), (qs4, dm4) = (blockq.pack_q8(q, d, lanes) for lanes in (16, 4))
        assert qs.shape == (2, 2, 8, 16, 4) and dm.shape == (2, 2, 16)
        assert qs[1, 1, 6, 3, 1].item() == q[19, 1, 25].item()
    assert torch.equal(blockq.dequantize_rows_torch(bits, qs, dm, 0, n, torch.float32),
                       blockq.dequantize_rows_torch(bits, qs4, dm4, 0, n, torch.float32))
    emb = BlockQEmbedding(BlockWeight(bits, qs, dm, n, k), torch.float32)
    ids = torch.tensor([[0, 15, 16, 20]])
    assert torch.equal(emb(ids), blockq.dequantize_rows_torch(bits, qs4, dm4, 0, n, torch.float32)[ids])


def test_a_layer_runs_the_kernel_that_reads_its_layout(kernels):
    """Weights are packed at load for this CPU's kernel; a variant that reads another layout is refused."""
    w = random_weight(4, 32, 64, lanes=blockq.load_lanes())
    layer = BlockQLinear(w)
    assert layer.isa == blockq.kernel_isa(blockq.load_lanes()) >= 0
    assert blockq.lanes_for(layer.isa) == blockq.load_lanes()
    if 2 in blockq.runnable_isas():
        four = random_weight(4, 32, 64, lanes=4)
        with pytest.raises(ValueError, match="reads 16-row groups"):
            blockq.qmatmul(torch.randn(1, 64), four.qs, four.dm, 4, 32, 2)


def test_dense_from_rows_per_kernel(monkeypatch):
    """AVX512-VNNI switches to the dense GEMM at 96 rows with AMX; it, AVX2 and AVX-VNNI never do otherwise."""
    from edgellm.kernels import blocklinear

    assert blocklinear.dense_from_rows(0) > 1 << 40 and blocklinear.dense_from_rows(1) > 1 << 40
    assert BlockQLinear.DENSE_FROM_ROWS == 32  # the decode/verify steps' entry limit
    monkeypatch.setattr(blocklinear.cpu, "has", lambda level: level == "amx")
    assert blocklinear.dense_from_rows(2) == 96
    monkeypatch.setattr(blocklinear.cpu, "has", lambda level: False)
    assert blocklinear.dense_from_rows(2) > 1 << 40


@pytest.mark.parametrize("rows", [1, 5, 40, 100])
def test_block_linear_both_paths(kernels, rows):
    w = random_weight(4, 96, 128, lanes=blockq.load_lanes())
    layer = BlockQLinear(w, bias=torch.randn(96))
    x = torch.randn(rows, 128)
    ref = F.linear(x, w.dequantize(), layer.bias)
    got = layer(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(layer.forward_exact(x), ref, rtol=1e-5, atol=1e-5)
    if rows >= layer.dense_from_rows:
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
    """The prefill path reuses one scratch buffer for dequantized weights, except when autograd needs them (and
    inputs that need gradients take it whatever their row count)."""
    lanes = blockq.load_lanes()
    a, b = (BlockQLinear(random_weight(4, 64, 64, seed=s, lanes=lanes)) for s in (1, 2))
    x = torch.randn(40, 64, requires_grad=True)
    b(a(x)).sum().backward()
    wa, wb = a.dequantized_weight(), b.dequantized_weight()
    xr = x.detach().clone().requires_grad_()
    F.linear(F.linear(xr, wa), wb).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
