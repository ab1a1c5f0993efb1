// The first example of docs/tensors.md: tensors in a message, compressed and back.
#include <hive/core/tensor_codec.hpp>

#include <ATen/ATen.h>
#include <fmt/core.h>

int main() {
  const at::Tensor weights = at::randn({256, 128});
  const at::Tensor step = at::tensor({42}, at::kLong);

  // Sender: tensors go into a message, payloads as blobs, descriptors in header["tensors"].
  hive::Message request;
  request.header = {{"method", "average"}};
  hive::add_tensors(request, {weights, step}, hive::Compression::quantile8);
  fmt::print("header: {}\n", request.header.dump());
  fmt::print("payload bytes: {} (uncompressed: {})\n", request.blob_bytes(), weights.nbytes() + step.nbytes());

  // Receiver: validates every descriptor against the limits, then decodes.
  const auto tensors = hive::get_tensors(request, hive::Limits().max_tensor_elements(1 << 20));
  const double rms = (tensors[0] - weights).pow(2).mean().sqrt().item<double>();
  fmt::print("dtype {}, rms error {:.4f}, step {}\n", c10::toString(tensors[0].scalar_type()), rms,
             tensors[1].item<std::int64_t>());

  // One tensor on its own: a descriptor and a payload Buffer.
  hive::EncodedTensor e = hive::encode_tensor(weights, hive::Compression::float16);
  const at::Tensor back = hive::decode_tensor(e.descriptor, e.payload);
  fmt::print("{} -> {} bytes, max error {:.5f}\n", e.descriptor.dump(), e.payload.size(),
             (back - weights).abs().max().item<double>());
}
