"""Names public transformer code gives its layers (last path segment, lower case):
the tables the tensor-parallel classifier matches."""

# Names public transformer code gives its layers (last path segment, lower case).
COLUMN_NAMES = frozenset(
    {
        "q",
        "k",
        "v",
        "q_proj",
        "k_proj",
        "v_proj",
        "wq",
        "wk",
        "wv",
        "query",
        "key",
        "value",
        "q_einsum",
        "kv_einsum",
        "qkv_einsum",
        "qkv",
        "qkv_proj",
        "wqkv",
        "c_attn",
        "in_proj",
        "query_key_value",
        "to_q",
        "to_k",
        "to_v",
        "to_qkv",
        "up",
        "up_proj",
        "gate",
        "gate_proj",
        "w1",
        "w3",
        "fc1",
        "linear1",
        "c_fc",
        "wi",
        "wi_0",
        "wi_1",
        "fc_in",
        "dense_h_to_4h",
        "gating_einsum",
        "w_in",
        "w_up",
        "w_gate",
    }
)
ROW_NAMES = frozenset(
    {
        "o",
        "o_proj",
        "wo",
        "out",
        "out_proj",
        "proj",
        "attn_out",
        "c_proj",
        "attn_vec_einsum",
        "to_out",
        "dense",
        "down",
        "down_proj",
        "w2",
        "fc2",
        "linear2",
        "fc_out",
        "dense_4h_to_h",
        "w_out",
        "w_down",
        "linear_einsum",
    }
)
FUSED_QKV_NAMES = frozenset(
    {"qkv", "qkv_proj", "wqkv", "c_attn", "in_proj", "query_key_value", "to_qkv"}
)
POSITION_NAMES = ("pos", "wpe", "position")
HEAD_NAMES = frozenset({"head", "lm_head", "unembed", "output", "logits", "out_head", "decoder"})
