import pytest
import torch

from quantc.packing import dequantize_gptq, pack_cols, pack_gptq, pack_rows, packed_bytes, unpack_cols, unpack_rows


def reference_pack(intweight, bits):
    """The classic GPTQ/AutoGPTQ packing loop (word by word), to pin the exact format."""
    import numpy as np
    intweight = intweight.numpy().astype(np.uint32)
    rows = intweight.shape[0] // 32 * bits
    q = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values over three words, two of them straddling
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i))
            i += 10
            q[row] |= intweight[i] << 30
            row += 1
            q[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= intweight[i] << 31
            row += 1
            q[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy(q.view(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_and_reference_layout(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(packed, reference_pack(q, bits))
    assert torch.equal(unpack_rows(packed, bits), q)
    qc = torch.randint(0, 2**bits, (3, 64), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_cols(pack_cols(qc, bits), bits), qc)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_formula(bits):
    g = torch.Generator().manual_seed(0)
    out, inp, gs = 64, 128, 32
    q = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (inp // gs, out), generator=g, dtype=torch.int32)
    scales = (torch.rand(inp // gs, out, generator=g) + 0.01).half().float()
    g_idx = torch.randperm(inp, generator=g).to(torch.int32) // gs     # act-order style groups
    t = pack_gptq(q, zeros, scales, g_idx, bits)
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    gl = g_idx.long()
    ref = (q.float() - zeros[gl].t().float()) * scales[gl].t()
    torch.testing.assert_close(w, ref)
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    assert nbytes == packed_bytes(inp, out, bits, gs)


def test_zero_point_zero_is_refused():
    q = torch.zeros(32, 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="zero points"):
        pack_gptq(q, torch.zeros(1, 32, dtype=torch.int32), torch.ones(1, 32), torch.zeros(32, dtype=torch.int32), 4)


def test_bad_shapes():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(33, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(32, 4, dtype=torch.int32), 5)


def test_tensorfile_writes_safetensors_own_bytes_one_tensor_at_a_time(tmp_path, monkeypatch):
    """tensorfile.write gives the bytes of safetensors' save_file on the same tensors, whether a tensor
    is made in memory or copied (in chunks) from another file; read_header reads what it wrote."""
    from safetensors.torch import load_file, save_file

    from quantc import tensorfile
    g = torch.Generator().manual_seed(0)
    tensors = {"z.scales": torch.randn(3, 5, generator=g).half(), "a.qweight": torch.randint(-2**31, 2**31 - 1, (4, 6),
               dtype=torch.int32, generator=g), "m.norm": torch.randn(7, generator=g).bfloat16(),
               "b.f32": torch.randn(2, 2, generator=g), "c.bool": torch.tensor([True, False, True]),
               "d.u8": torch.arange(9, dtype=torch.uint8), "e.scalar": torch.tensor(3.5), "f.empty": torch.zeros(0, 4),
               "g.i64": torch.arange(5), "h.i8": torch.arange(-3, 3, dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    src = {k: v for k, v in tensors.items() if k < "d"}                       # some copied from a file ...
    save_file(src, str(tmp_path / "src.safetensors"))
    entries = tensorfile.file_entries(tmp_path / "src.safetensors")
    for k, v in tensors.items():                                               # ... the rest made when written
        if k not in src:
            entries[k] = tensorfile.tensor_entry(lambda v=v: v.clone(), v.dtype, v.shape)
    monkeypatch.setattr(tensorfile, "COPY_CHUNK", 5)
    n = tensorfile.write(tmp_path / "out.safetensors", dict(reversed(list(entries.items()))), {"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert n == sum(v.numel() * v.element_size() for v in tensors.values())
    header, start = tensorfile.read_header(tmp_path / "out.safetensors")
    assert header["__metadata__"] == {"format": "pt"} and start % 8 == 0
    assert all(torch.equal(load_file(str(tmp_path / "out.safetensors"))[k], v) for k, v in tensors.items())
    for meta in (None, {}):                                   # no metadata, and an empty one, as save_file writes them
        save_file(tensors, str(tmp_path / "ref2.safetensors"), metadata=meta)
        made = {k: tensorfile.tensor_entry(lambda v=v: v, v.dtype, v.shape) for k, v in tensors.items()}
        tensorfile.write(tmp_path / "out2.safetensors", made, meta)
        assert (tmp_path / "out2.safetensors").read_bytes() == (tmp_path / "ref2.safetensors").read_bytes(), meta
    bad = {"x": tensorfile.tensor_entry(lambda: torch.zeros(3), torch.float32, (4,))}
    with pytest.raises(ValueError, match="announced"):
        tensorfile.write(tmp_path / "bad.safetensors", bad)
    assert not list(tmp_path.glob("bad.safetensors*"))                        # nor its temporary file


def _packed(bits=4, out=64, inp=128, gs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (inp // gs, out), generator=g, dtype=torch.int32)
    scales = (torch.rand(inp // gs, out, generator=g) * 0.1 + 0.001).half().float()
    return pack_gptq(q, zeros, scales, torch.arange(inp, dtype=torch.int32) // gs, bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_rounds_each_weight_once(dtype):
    """(q − z)·s is exact in float32, so the weight in a narrower dtype is the float32 one rounded once
    (computing in bfloat16 rounded the scale first: most weights then came out one step off)."""
    t = _packed()
    w32 = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, dtype)
    assert w.dtype == dtype and torch.equal(w, w32.to(dtype))


def test_a_loaded_linear_follows_to_dtype_and_keeps_its_format():
    """QuantLinear.to(bfloat16) after a forward in float32: the kept dense weight is made again in
    bfloat16, the bias follows, the float16 scales stay as stored (a cast would round them), and the
    forward runs; GGMLLinear follows the same way."""
    from quantc.runtime import GGMLLinear, QuantLinear
    t = _packed()
    m = QuantLinear(128, 64, 4, 32, bias=True)
    m.load_state_dict({**t, "bias": torch.randn(64)})
    x = torch.randn(3, 128)
    y32 = m(x)
    scales = m.scales.clone()
    assert m.to(torch.bfloat16) is m
    assert m.scales.dtype == torch.float16 and torch.equal(m.scales, scales)
    assert m.qweight.dtype == torch.int32 and m.bias.dtype == torch.bfloat16
    assert m.weight.dtype == torch.bfloat16
    assert torch.equal(m.weight, dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4).to(torch.bfloat16))
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    m.float()
    assert torch.equal(m.weight, dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4))   # scales kept
    m16 = QuantLinear(128, 64, 4, 32, bias=False, dtype=torch.bfloat16)    # quantc.load(..., dtype=bfloat16)
    m16.load_state_dict(t)
    m16.to(torch.bfloat16)                        # a cast to the dtype it has: the scales still stay
    assert m16.scales.dtype == torch.float16 and torch.equal(m16.scales, t["scales"])
    gl = GGMLLinear(64, 8, "Q8_0", bias=False)
    assert gl.weight.dtype == torch.float32
    gl.half()
    assert gl.weight.dtype == torch.float16 and gl.qblocks.dtype == torch.uint8
