// The doctest runner. With HIVE_TEST_CHILD=serve it is instead a helper process for the tests
// that kill a peer for real: it serves "echo" and "hang" on loopback TCP, prints its address
// and runs until killed (or until its stdin closes, so it never outlives the test).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "net_fixtures.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

namespace {
int serve_until_killed() {
  using namespace std::chrono_literals;
  hive::net::Runtime runtime(1);
  auto server = hive::net::Rpc<hive::net::Tcp>::create(runtime.executor());
  server->add_handler("echo", hive::test::echo);
  server->add_handler("hang", [](hive::net::CallContext, hive::Message) -> asio::awaitable<hive::Message> {
    asio::steady_timer t(co_await asio::this_coro::executor, 1h);
    co_await t.async_wait(asio::use_awaitable);
    co_return hive::Message{};
  });
  std::cout << server->listen("127.0.0.1:0") << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  server->close();
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  if (const char* child = std::getenv("HIVE_TEST_CHILD"); child && std::strcmp(child, "serve") == 0)
    return serve_until_killed();
  doctest::Context context(argc, argv);
  return context.run();
}
