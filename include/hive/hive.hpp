#pragma once
/// @file
/// The umbrella header: hive's public API in one include (brings in libtorch).
///
/// Torch-free users (DHT-only tools) include the layer headers under hive/core, hive/net and
/// hive/dht directly, which compile in seconds.

#include <hive/fwd.hpp>

#include <torch/torch.h>

#include <hive/core/buffer.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/core/limits.hpp>
#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/core/options.hpp>
#include <hive/core/tensor_codec.hpp>

#include <hive/net/frame.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/simulated.hpp>
#include <hive/net/tcp.hpp>
#include <hive/net/transport.hpp>

#include <hive/dht/dht.hpp>
#include <hive/dht/experts.hpp>

#include <hive/moe/backend.hpp>
#include <hive/moe/experts.hpp>
#include <hive/moe/mixture.hpp>
#include <hive/moe/remote_expert.hpp>
#include <hive/moe/scheduler.hpp>
#include <hive/moe/schema.hpp>
#include <hive/moe/server.hpp>

#include <hive/averaging/averager.hpp>
#include <hive/averaging/butterfly.hpp>
#include <hive/averaging/group.hpp>
#include <hive/averaging/powersgd.hpp>
#include <hive/averaging/state.hpp>

#include <hive/optim/collaborative.hpp>
#include <hive/optim/decentralized.hpp>
#include <hive/optim/diloco.hpp>
#include <hive/optim/progress.hpp>
#include <hive/serve/client.hpp>
#include <hive/serve/replica.hpp>
#include <hive/serve/server.hpp>
#include <hive/serve/snapshot.hpp>

#include <hive/trainer.hpp>
