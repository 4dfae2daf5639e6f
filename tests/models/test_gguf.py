"""The GGUF reader and lazily dequantized slices, on small files written with gguf's writer."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from models.gguf_convert import convert_gguf
from models.gguf_file import SUPPORTED_TYPES, hf_config, open_tensors, read_gguf
from models.gguf_weights import GGUFSlice, permute_rows, unpermute_rows
from tests.models.gguf_files import llama_cpp_permute, write_gguf

ROWS, COLS = 24, 512  # 512 columns: two 256-element K-quant super-blocks per row
HEADS = 3             # 24 rows = 3 heads of 8


def dequantized_by_gguf(data: np.ndarray, type_name: str) -> np.ndarray:
    return dequantize(np.asarray(data), GGMLQuantizationType[type_name]).astype(np.float32)


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    """One GGUF holding a ROWS x COLS matrix of every supported type, plus a 1-D norm."""
    rng = np.random.default_rng(0)
    tensors = {f"t.{name}.weight": (rng.standard_normal((ROWS, COLS)).astype(np.float32), name)
               for name in SUPPORTED_TYPES}
    tensors["norm.weight"] = (rng.standard_normal(COLS).astype(np.float32), "F32")
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "typed.gguf", tensors)
    _, index = read_gguf(path)
    return index, open_tensors(path.parent, index)


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_every_supported_type_dequantizes_as_gguf_does(typed_file, type_name):
    index, views = typed_file
    name = f"t.{type_name}.weight"
    info = next(t for t in index.tensors if t.name == name)
    assert info.type_name == type_name and info.shape == (ROWS, COLS)
    expected = dequantized_by_gguf(views[name], type_name)
    assert expected.std() > 1e-3  # real values, not zeros: the comparison has teeth
    got = GGUFSlice(name, views[name], type_name, info.shape)[:]
    assert got.dtype == torch.float32 and tuple(got.shape) == (ROWS, COLS)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=0, atol=0)


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_tp_slices_equal_slices_of_the_full_tensor(typed_file, type_name, tp):
    index, views = typed_file
    name = f"t.{type_name}.weight"
    for heads in (None, HEADS):  # heads: the q/k permutation, undone per whole head
        tensor = GGUFSlice(name, views[name], type_name, (ROWS, COLS), heads)
        full = tensor.full()
        rows, cols = ROWS // tp, COLS // tp  # column splits by 3 cut through quant blocks
        for rank in range(tp):
            r, c = rank * rows, rank * cols
            assert torch.equal(tensor[r:r + rows], full[r:r + rows])
            assert torch.equal(tensor[:, c:c + cols], full[:, c:c + cols])
        assert torch.equal(tensor[5:13], full[5:13])  # across heads and blocks


def test_norms_and_slices_of_one_dimension(typed_file):
    index, views = typed_file
    norm = GGUFSlice("norm.weight", views["norm.weight"], "F32", (COLS,))
    assert torch.equal(norm[:], torch.from_numpy(np.array(views["norm.weight"])))
    assert torch.equal(norm[3:9], norm[:][3:9])
    with pytest.raises(ValueError, match="1 dimension"):
        norm[:, 1:2]


def test_permutation_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((HEADS * 8, 16)).astype(np.float32)  # [heads * head_dim, hidden]
    assert not np.array_equal(llama_cpp_permute(w, HEADS), w)
    np.testing.assert_array_equal(permute_rows(w, HEADS), llama_cpp_permute(w, HEADS))
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, HEADS), HEADS), w)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.attn_q.weight": (llama_cpp_permute(w, HEADS), "F32")})
    _, index = read_gguf(path)
    q = GGUFSlice("blk.0.attn_q.weight", open_tensors(tmp_path, index)["blk.0.attn_q.weight"],
                  "F32", (HEADS * 8, 16), num_heads=HEADS)
    assert torch.equal(q[:], torch.from_numpy(w))
    assert torch.equal(q[8:16], torch.from_numpy(w[8:16]))  # one head, undone on its own rows
    bias = rng.standard_normal(HEADS * 8).astype(np.float32)  # llama.cpp permutes q/k biases too
    path = write_gguf(tmp_path / "b.gguf",
                      {"blk.0.attn_q.bias": (llama_cpp_permute(bias, HEADS), "F32")})
    _, index = read_gguf(path)
    b = GGUFSlice("blk.0.attn_q.bias", open_tensors(tmp_path, index)["blk.0.attn_q.bias"],
                  "F32", (HEADS * 8,), num_heads=HEADS)
    assert torch.equal(b[:], torch.from_numpy(bias))
    assert torch.equal(b[8:16], torch.from_numpy(bias[8:16]))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf",
                      {"token_embd.weight": (np.ones((64, 32), np.float32), "Q8_0")})
    data = path.read_bytes()
    for size in (len(data) - 100, 40, 3):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"t\.gguf.*truncated"):
            read_gguf(path)


def test_changed_file_after_conversion_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", {"x.weight": (np.ones((4, 32), np.float32), "F32")})
    _, index = read_gguf(path)
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match="missing or changed since it was converted"):
        open_tensors(tmp_path, index)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"token_embd.weight": (np.ones((8, 32), np.float32), "F32")},
                      arch="gpt2")
    metadata, index = read_gguf(path)
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported; supported: llama"):
        hf_config(metadata, index)
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_unsupported_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "u.gguf", {
        "token_embd.weight": (np.ones((8, 256), np.float32), "Q8_0"),
        "blk.0.attn_q.weight": (np.ones((8, 256), np.float32), "TQ1_0"),
    })
    _, index = read_gguf(path)
    with pytest.raises(ValueError, match=r"\['TQ1_0'\] are not supported \(tensors "
                                         r"blk\.0\.attn_q\.weight \(TQ1_0\)\); supported: F32"):
        index.check_types()
    with pytest.raises(ValueError, match="TQ1_0"):
        convert_gguf(path, tmp_path / "converted")


@pytest.mark.parametrize("rank", range(3))
def test_each_tp_rank_loads_from_gguf_what_it_loads_from_the_full_tensor(tmp_path, rank):
    """Every kind of TP layer, given GGUF slices (Q8_0 and Q4_K, q/k permuted, 9 heads over 3
    kv heads as in SmolLM2), holds what it holds when given the dequantized full tensors."""
    from models.embedding import VocabParallelEmbedding
    from models.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from models.parallel import ParallelContext

    rng = np.random.default_rng(2)
    heads, kv_heads, head_dim, hidden = 9, 3, 32, 256
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
              "ffn_gate": (96, hidden), "ffn_down": (hidden, 768), "token_embd": (50, hidden)}
    types = {"attn_output": "Q8_0", "ffn_down": "Q4_K"}  # row-parallel: 3-way column splits
    tensors = {f"{name}.weight": (rng.standard_normal(shape).astype(np.float32),
                                  types.get(name, "Q8_0")) for name, shape in shapes.items()}
    path = write_gguf(tmp_path / "tp.gguf", tensors)
    _, index = read_gguf(path)
    views = open_tensors(tmp_path, index)
    permuted = {"attn_q": heads, "attn_k": kv_heads}

    def gguf(name):
        info = next(t for t in index.tensors if t.name == f"{name}.weight")
        return GGUFSlice(info.name, views[info.name], info.type_name, info.shape,
                         permuted.get(name))

    ctx = ParallelContext(rank=rank, world_size=3)
    layers = [(QKVParallelLinear(hidden, head_dim, heads, kv_heads, ctx=ctx),
               [("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")]),
              (RowParallelLinear(heads * head_dim, hidden, ctx=ctx), [("attn_output", None)]),
              (MergedColumnParallelLinear(hidden, [96, 96], ctx=ctx),
               [("ffn_gate", 0), ("ffn_gate", 1)]),
              (RowParallelLinear(768, hidden, ctx=ctx), [("ffn_down", None)]),
              (VocabParallelEmbedding(50, hidden, ctx), [("token_embd", None)])]
    for layer, parts in layers:
        from_full = torch.empty_like(layer.weight)
        for name, shard in parts:
            layer.weight_loader(layer.weight, gguf(name), shard)  # this rank's slice only
            layer.weight_loader(from_full, gguf(name).full(), shard)
        assert from_full.abs().sum() > 0
        torch.testing.assert_close(layer.weight.detach(), from_full, rtol=0, atol=0)
