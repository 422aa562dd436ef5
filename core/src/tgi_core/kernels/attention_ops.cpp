// tgi::attention as a C++ CPU kernel of the dispatcher: in a decode step, the self-attention
// layers (of a compiled graph, or eager) go straight to the paged decode kernel, without the
// Python implementation, its plan lookups and the ctypes call (~25 us a layer on the
// SmolLM shape). Everything else goes to tgi::attention_general, the Python
// implementation (tgi_core/model/layers/opaque.py).
//
// Two pieces of state, both set from Python (tgi_core/attention/native.py):
// - the layers: key -> the cache tensors of the layer (raw pointers, tagged with the
//   serial of the KVCache they belong to), its scale; registered by the Python path the
//   first time it takes the plain decode kernel for the layer;
// - the step (per thread): the serial of the step's KVCache, its sequences' block
//   tables, lengths and new-token slots; installed around a model call when every
//   sequence of the step decodes one token.
// A layer runs here only when its serial is the step's (its pointers are the step's
// cache) and q, k and v have the shapes and layouts the kernel takes; else the Python
// path runs it.
//
// Built against the installed torch like gemm_ops.cpp (load_torch_library); the decode
// kernel itself stays in paged_decode.cpp, whose bf16 entry point tgi_attention_ops_bind
// hands over.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace {

using DecodeBf16 = int (*)(const uint16_t* q, uint16_t* k, uint16_t* v, const int64_t* tables,
                           const int64_t* lens, uint16_t* out, int64_t S, int64_t H, int64_t Hkv,
                           int64_t D, int64_t block_size, int64_t max_blocks, float scale,
                           const uint16_t* new_k, const uint16_t* new_v, const int64_t* new_slots,
                           int64_t new_k_stride, int64_t new_v_stride, int64_t num_slots,
                           const float* bias, int64_t bias_stride);

DecodeBf16 g_decode = nullptr;

struct Layer {
  int64_t serial;  // of the KVCache whose tensors k and v are
  uint16_t* k;
  uint16_t* v;
  int64_t num_slots, kv_heads, head_dim;
  float scale;
};

std::mutex g_layers_mutex;
std::unordered_map<int64_t, Layer> g_layers;

struct Step {
  int64_t serial = -1;  // -1: no step installed
  const int64_t* tables = nullptr;
  const int64_t* lengths = nullptr;
  const int64_t* slots = nullptr;
  int64_t num_seqs = 0, block_size = 0, max_blocks = 0;
};

thread_local Step t_step;

std::optional<Layer> find_layer(int64_t key) {
  std::lock_guard<std::mutex> lock(g_layers_mutex);
  const auto found = g_layers.find(key);
  if (found == g_layers.end()) return std::nullopt;
  return found->second;
}

// k or v of the step: [S, Hkv, D] bf16, each row dense (rows may be strided)
bool new_rows_fit(const at::Tensor& x, const Step& step, const Layer& layer) {
  return x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.size(0) == step.num_seqs &&
         x.size(1) == layer.kv_heads && x.size(2) == layer.head_dim && x.stride(2) == 1 &&
         x.stride(1) == layer.head_dim;
}

at::Tensor attention_general(const at::Tensor& q, const std::optional<at::Tensor>& k,
                             const std::optional<at::Tensor>& v, int64_t key) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tgi::attention_general", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t)>();
  return op.call(q, k, v, key);
}

// q [S, H, D] -> [S, H * D]: the decode kernel for a registered layer of the installed
// step, which writes k and v to the cache at the step's slots first; else the Python path
at::Tensor attention(const at::Tensor& q, const std::optional<at::Tensor>& k,
                     const std::optional<at::Tensor>& v, int64_t key) {
  const Step step = t_step;
  if (step.serial < 0 || g_decode == nullptr || !k.has_value() || !v.has_value())
    return attention_general(q, k, v, key);
  const std::optional<Layer> layer = find_layer(key);
  if (!layer || layer->serial != step.serial || q.scalar_type() != at::kBFloat16 ||
      q.dim() != 3 || q.size(0) != step.num_seqs || q.size(2) != layer->head_dim ||
      q.size(1) % layer->kv_heads != 0 || !new_rows_fit(*k, step, *layer) ||
      !new_rows_fit(*v, step, *layer))
    return attention_general(q, k, v, key);
  const at::Tensor query = q.contiguous();
  at::Tensor out = at::empty_like(query);
  const int64_t heads = query.size(1), head_dim = layer->head_dim;
  const int status =
      g_decode(reinterpret_cast<const uint16_t*>(query.const_data_ptr()), layer->k, layer->v,
               step.tables, step.lengths, reinterpret_cast<uint16_t*>(out.mutable_data_ptr()),
               step.num_seqs, heads, layer->kv_heads, head_dim, step.block_size,
               step.max_blocks, layer->scale,
               reinterpret_cast<const uint16_t*>(k->const_data_ptr()),
               reinterpret_cast<const uint16_t*>(v->const_data_ptr()), step.slots,
               k->stride(0), v->stride(0), layer->num_slots, nullptr, 0);
  TORCH_CHECK_INDEX(status == 0, "paged_decode: a new token's slot is outside the ",
                    layer->num_slots);
  return out.view({step.num_seqs, heads * head_dim});
}

}  // namespace

extern "C" {

// paged_decode.cpp's tgi_paged_decode_bf16; until it is bound, every call goes to Python.
void tgi_attention_ops_bind(void* decode) { g_decode = reinterpret_cast<DecodeBf16>(decode); }

// Layer ``key`` attends over bf16 caches ``k`` / ``v`` [num_slots, kv_heads, head_dim] of
// the KVCache numbered ``serial`` (the caller keeps them alive while a step of that cache
// can be installed); replaces what the key had.
void tgi_attention_register_layer(int64_t key, int64_t serial, void* k, void* v,
                                  int64_t num_slots, int64_t kv_heads, int64_t head_dim,
                                  float scale) {
  std::lock_guard<std::mutex> lock(g_layers_mutex);
  g_layers[key] = Layer{serial,    static_cast<uint16_t*>(k), static_cast<uint16_t*>(v),
                        num_slots, kv_heads,                  head_dim,
                        scale};
}

// This thread's decode step: serial of its KVCache (-1: none), int64 block tables
// [num_seqs, max_blocks], lengths [num_seqs] (new tokens included) and new-token slots
// [num_seqs], which the caller keeps alive until it installs another step.
void tgi_attention_set_step(int64_t serial, const int64_t* tables, const int64_t* lengths,
                            const int64_t* slots, int64_t num_seqs, int64_t block_size,
                            int64_t max_blocks) {
  t_step = Step{serial, tables, lengths, slots, num_seqs, block_size, max_blocks};
}

}  // extern "C"

TORCH_LIBRARY_IMPL(tgi, CPU, m) { m.impl("attention", &attention); }
