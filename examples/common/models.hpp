#pragma once
// The image classifiers of the averaging examples, shared by every program that must build
// the same architecture as the swarm (averaging_peer trains them, hive-infer and
// live_inference serve them), and their test accuracy.

#include "fashion_mnist.hpp"

#include <hive/moe/schema.hpp>

#include <torch/torch.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>

namespace hive::examples {

/// A small convolutional network for CIFAR-10 images [n, 3, 32, 32].
inline torch::nn::Sequential cifar_model() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(3, 16, 5)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(16, 32, 5)), nn::ReLU(), nn::MaxPool2d(2), nn::Flatten(),
                        nn::Linear(32 * 5 * 5, 128), nn::ReLU(), nn::Linear(128, 10));
}

/// The same kind of network for Fashion-MNIST images [n, 784] (28x28, one channel).
inline torch::nn::Sequential fashion_model() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Unflatten(nn::UnflattenOptions(1, {1, 28, 28})), nn::Conv2d(nn::Conv2dOptions(1, 16, 5)),
                        nn::ReLU(), nn::MaxPool2d(2), nn::Conv2d(nn::Conv2dOptions(16, 32, 5)), nn::ReLU(),
                        nn::MaxPool2d(2), nn::Flatten(), nn::Linear(32 * 4 * 4, 128), nn::ReLU(), nn::Linear(128, 10));
}

/// The rows each model takes: one Fashion-MNIST image, or one CIFAR-10 image.
inline moe::TensorSchema image_schema(bool cifar) {
  return cifar ? moe::TensorSchema{at::kFloat, {3, 32, 32}} : moe::TensorSchema{at::kFloat, {784}};
}

/// Percentage of `test` that `model` classifies correctly (in eval mode, batches of 1000).
inline double accuracy(torch::nn::Sequential& model, const Dataset& test) {
  torch::NoGradGuard no_grad;
  model->eval();
  std::int64_t correct = 0;
  for (std::int64_t at = 0; at < test.images.size(0); at += 1000) {
    const auto n = std::min<std::int64_t>(1000, test.images.size(0) - at);
    correct += model->forward(test.images.narrow(0, at, n)).argmax(1).eq(test.labels.narrow(0, at, n)).sum().item<std::int64_t>();
  }
  model->train();
  return 100.0 * static_cast<double>(correct) / static_cast<double>(test.images.size(0));
}

/// Limits OpenBLAS's own thread pool to `n` threads when OpenBLAS is the BLAS in use (Debian's
/// libopenblas0-pthread); returns false for any other BLAS. at::set_num_threads does not reach
/// that pool: without this, every matrix product of the training thread and of each serving
/// thread fans out to all cores, and on a machine of 2 cores serving an FFN cost training half
/// its samples/s (benchmark_inference). OPENBLAS_NUM_THREADS=1 in the environment does the same.
inline bool limit_blas_threads(int n) {
  using SetThreads = void (*)(int);
  auto* set = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (!set) return false;
  set(n);
  return true;
}

}  // namespace hive::examples
