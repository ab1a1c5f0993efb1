// The Learning@home throughput experiment (examples/common/lah_throughput.hpp): its flags, the
// layout of the layers on the servers, and that the emulated latency reaches the measurement:
// each batch takes at least its hops' time, and concurrent DMoE trainers outrun the pipeline
// when latency dominates.
#include "../common/error_of.hpp"
#include "../../examples/common/lah_throughput.hpp"

#include <doctest/doctest.h>

#include <set>

using namespace hive;
namespace lah = hive::examples::lah_throughput;

using hive::test::error_of;

namespace {

/// A model small enough that its compute is negligible next to the hops.
lah::Config tiny() {
  lah::Config c;
  c.servers = 2;
  c.layers_per_server = 1;
  c.hidden_dim = 8;
  c.batch_size = 2;
  c.trainers = 8;
  c.batches = 2;
  c.timeout_s = 60;
  return c;
}

}  // namespace

TEST_CASE("lah throughput: bad flags are refused before any work, naming the flag") {
  auto parse = [](std::vector<std::string> args) { return lah::parse_flags(args); };
  CHECK(error_of([&] { parse({"--block", "lstm"}); }).find("unknown block type 'lstm'") != std::string::npos);
  CHECK(error_of([&] { parse({"--latencies", "0,-10"}); }).find("latency -10 ms") != std::string::npos);
  CHECK(error_of([&] { parse({"--latencies", "0,fast"}); }).find("--latencies takes a number") != std::string::npos);
  CHECK(error_of([&] { parse({"--hosts", ","}); }).find("--hosts needs at least one") != std::string::npos);
  CHECK(error_of([&] { parse({"--hosts", "nonsense"}); }) != "");
  CHECK(error_of([&] { parse({"--trainers", "0"}); }).find("--trainers") != std::string::npos);
  CHECK(error_of([&] { parse({"--frobnicate", "1"}); }).find("unknown flag '--frobnicate'") != std::string::npos);
  CHECK(error_of([&] { parse({"--batches"}); }).find("--batches needs a value") != std::string::npos);
  CHECK(error_of([&] { parse({"--servers", "3", "--hosts", "127.0.0.1:1,127.0.0.1:2"}); })
            .find("every host is one server") != std::string::npos);
  CHECK(error_of([&] { parse({"--layers", "5", "--servers", "2"}); }).find("multiple of the 2 servers") !=
        std::string::npos);
  CHECK_THROWS_AS(parse({"--block", "lstm"}), InvalidArgument);
  CHECK(parse({"--layers", "6", "--servers", "3"}).config.layers_per_server == 2);

  const auto f = parse({"--hosts", "127.0.0.1:1,127.0.0.1:2", "-j", "4", "--latencies", "0,25.5", "--forward-only"});
  CHECK(f.config.servers == 2);
  CHECK_FALSE(f.config.emulated());
  CHECK(f.config.trainers == 4);
  CHECK(f.config.latencies_ms == std::vector<double>{0, 25.5});
  CHECK_FALSE(f.config.backward);
}

TEST_CASE("lah throughput: every expert lives on exactly one server, consecutive layers on different ones") {
  lah::Config c;
  c.servers = 3;
  c.layers_per_server = 2;
  c.experts_per_layer = 2;
  std::set<std::string> all;
  for (std::int64_t s = 0; s < c.servers; ++s) {
    const auto uids = lah::uids_of_server(c, s);
    CHECK(static_cast<std::int64_t>(uids.size()) == c.experts_per_server());
    for (const auto& uid : uids) CHECK(all.insert(uid).second);
  }
  CHECK(static_cast<std::int64_t>(all.size()) == c.layers() * c.experts_per_layer);
  for (std::int64_t l = 0; l + 1 < c.layers(); ++l)
    CHECK(lah::server_of(l, 0, c.servers) != lah::server_of(l + 1, 0, c.servers));
  CHECK(lah::uid_pattern(c) == "expert.[0:6].[0:2]");
}

TEST_CASE("lah throughput: on the emulator each batch pays its hops, and concurrent trainers outrun the pipeline") {
  const auto c = tiny();
  constexpr double latency_ms = 50;
  const auto latency = Seconds(latency_ms / 1000);
  const auto pipeline = lah::measure_point(c, lah::Mode::pipeline, latency_ms, nullptr, 1);
  const auto dmoe = lah::measure_point(c, lah::Mode::dmoe, latency_ms, nullptr, 2);
  REQUIRE(pipeline.complete);
  REQUIRE(dmoe.complete);
  CHECK(pipeline.streams == 1);
  CHECK(dmoe.streams == c.trainers);
  CHECK(dmoe.samples == c.trainers * c.batches * c.batch_size);
  // Timers never fire early: a batch cannot beat its hops (2 layers, forward and backward:
  // 0.2 s for the pipeline, 0.4 s for a DMoE trainer, whose calls are round trips).
  CHECK(pipeline.batch_s >= lah::latency_floor(c, lah::Mode::pipeline, latency).count());
  CHECK(dmoe.batch_s >= lah::latency_floor(c, lah::Mode::dmoe, latency).count());
  CHECK(lah::latency_floor(c, lah::Mode::dmoe, latency).count() == doctest::Approx(0.4));
  // 8 trainers, each half as fast as the pipeline: 4x expected, whatever the machine's load
  // adds to both; 2x is the bar.
  CHECK(dmoe.samples_per_s > 2 * pipeline.samples_per_s);
}

TEST_CASE("lah throughput: over TCP the trainers sleep the hops, and a mismatched server is named") {
  auto c = tiny();
  c.trainers = 2;
  c.batches = 1;
  const auto options = ServerOptions().dht(DHTOptions().listen_on("127.0.0.1:0")).update_period(Seconds(60));
  std::vector<std::unique_ptr<Server<>>> servers;
  std::vector<std::string> hosts;
  for (std::int64_t s = 0; s < c.servers; ++s) {
    servers.push_back(
        std::make_unique<Server<>>(moe::make_backends("ffn", lah::uids_of_server(c, s), c.hidden_dim), options));
    hosts.push_back(servers.back()->address());
  }
  c.hosts = hosts;
  auto client = std::make_shared<moe::Client<net::Tcp>>();
  const auto latency = Seconds(0.02);
  const auto m = lah::measure_point(c, lah::Mode::pipeline, 20, client, 3);
  REQUIRE(m.complete);
  CHECK(m.batch_s >= lah::latency_floor(c, lah::Mode::pipeline, latency).count());
  CHECK(servers[0]->backend("expert.0.0").updates() >= 2);  // warm-up and measured backward

  auto wide = c;
  wide.hidden_dim = 16;  // the servers serve h=8
  const auto error = error_of([&] { (void)lah::measure_point(wide, lah::Mode::dmoe, 0, client, 4); });
  CHECK(error.find("warm-up batch, expert.0.0 at " + hosts[0]) != std::string::npos);
  CHECK(error.find("float32[*, 8]") != std::string::npos);
}
