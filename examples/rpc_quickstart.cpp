// The quickstart of docs/net.md: two peers on loopback TCP, one call.
#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/tcp.hpp>

using namespace std::chrono_literals;
using Rpc = hive::net::Rpc<hive::net::Tcp>;

int main() {
  hive::net::Runtime runtime(2);                       // io threads, shared by both peers
  auto server = Rpc::create(runtime.executor());
  server->add_handler("greet", [](hive::net::CallContext ctx, hive::Message m) -> asio::awaitable<hive::Message> {
    co_return hive::Message{nlohmann::json{{"hello", m.header}, {"you_are", ctx.remote_address}}, {}};
  });
  const std::string address = server->listen("127.0.0.1:0");   // port 0: pick a free one

  auto client = Rpc::create(runtime.executor());
  hive::Message reply = client->call(address, "greet", hive::Message{nlohmann::json("world"), {}}, 5s);
  fmt::print("{}\n", reply.header.dump());
  client->close();
  server->close();
}
