// Encryption of connections after the handshake (docs/protocol.md, "Encryption";
// docs/security.md, "Encryption"): negotiation, sealed records of every size, what a wire
// observer sees, tampering, and peers that require it.
#include "../common/error_of.hpp"
#include "../common/raw_client.hpp"
#include "net_fixtures.hpp"

#include <hive/net/handshake.hpp>

#include <doctest/doctest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <mutex>
#include <thread>

using namespace hive;
using namespace std::chrono_literals;

namespace {

/// A TCP forwarder on 127.0.0.1 between a caller and `upstream`: it records what passes each
/// way and, when armed, flips one bit of a chosen byte (a man in the middle without the keys).
class Proxy {
 public:
  /// Which way bytes travel.
  enum Direction { to_callee = 0, to_caller = 1 };

  explicit Proxy(std::string upstream) : upstream_(net::HostPort::parse(upstream)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(listen_fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    REQUIRE(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listen_fd_, 16) == 0);
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;
  ~Proxy() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    {
      std::lock_guard lock(mutex_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : pumps_) t.join();
    for (int fd : fds_) ::close(fd);
    ::close(listen_fd_);
  }

  /// The address callers dial.
  [[nodiscard]] std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  /// Everything forwarded in `d` so far, on all connections.
  [[nodiscard]] std::string seen(Direction d) {
    std::lock_guard lock(mutex_);
    return seen_[d];
  }

  /// Flips the lowest bit of the byte `offset` bytes after the next one forwarded in `d`.
  void tamper(Direction d, std::size_t offset) {
    std::lock_guard lock(mutex_);
    tamper_[d] = static_cast<long long>(offset);
  }

 private:
  void accept_loop() {
    for (int n = 0; n < 1000 && !stop_; ++n) {
      const int down = ::accept(listen_fd_, nullptr, nullptr);
      if (down < 0) return;
      const int up = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(upstream_.port);
      ::inet_pton(AF_INET, upstream_.host.c_str(), &addr.sin_addr);
      if (::connect(up, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        ::close(up);
        ::close(down);
        continue;
      }
      std::lock_guard lock(mutex_);
      fds_.push_back(down);
      fds_.push_back(up);
      pumps_.emplace_back([this, down, up] { pump(down, up, to_callee); });
      pumps_.emplace_back([this, down, up] { pump(up, down, to_caller); });
    }
  }

  // Forwards from `from` to `to` until either side closes; then closes both ways.
  void pump(int from, int to, Direction d) {
    std::vector<char> buf(1 << 16);
    for (;;) {
      const ssize_t n = ::read(from, buf.data(), buf.size());
      if (n <= 0) break;
      {
        std::lock_guard lock(mutex_);
        if (tamper_[d] >= 0) {
          if (tamper_[d] < n) {
            buf[static_cast<std::size_t>(tamper_[d])] ^= 1;
            tamper_[d] = -1;
          } else {
            tamper_[d] -= n;
          }
        }
        seen_[d].append(buf.data(), static_cast<std::size_t>(n));
      }
      ssize_t off = 0;
      while (off < n) {
        const ssize_t w = ::send(to, buf.data() + off, static_cast<std::size_t>(n - off), MSG_NOSIGNAL);
        if (w <= 0) break;
        off += w;
      }
      if (off < n) break;
    }
    ::shutdown(from, SHUT_RDWR);
    ::shutdown(to, SHUT_RDWR);
  }

  net::HostPort upstream_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::mutex mutex_;
  std::vector<int> fds_;
  std::vector<std::thread> pumps_;
  std::string seen_[2];
  long long tamper_[2] = {-1, -1};
};

/// `n` bytes whose content depends on `seed` and position.
Buffer pattern_blob(std::size_t n, std::uint32_t seed) {
  std::vector<std::byte> bytes(n);
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto& b : bytes) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<std::byte>(x >> 24);
  }
  return Buffer::adopt(std::move(bytes));
}

using TcpPeer = std::shared_ptr<net::Rpc<net::Tcp>>;

using Conn = std::shared_ptr<net::Tcp::Connection>;

// The callee's side of handshake_pair: the connection and the caller's id (empty on failure).
asio::awaitable<std::pair<Conn, std::string>> accept_one(net::Tcp* server, const Identity* me, net::EncryptionPolicy policy) {
  auto conn = co_await server->accept();
  std::string peer;
  try {
    auto op = net::server_handshake(conn, *me, deadline_after(Seconds(10)), policy);
    peer = co_await std::move(op);
  } catch (const std::exception&) {
    conn->close();
  }
  co_return std::pair{conn, peer};
}

// The caller's side of handshake_pair.
asio::awaitable<std::pair<Conn, std::string>> dial_one(net::Tcp* client, std::string address, const Identity* me,
                                                       net::EncryptionPolicy policy) {
  auto conn = co_await client->connect(address, deadline_after(Seconds(10)));
  auto op = net::client_handshake(conn, *me, deadline_after(Seconds(10)), policy);
  auto peer = co_await std::move(op);
  co_return std::pair{conn, peer};
}

/// Whether the connection that two handshakes under these policies open is encrypted at the
/// caller and at the callee; `error` gets the caller's failure, if any.
std::pair<bool, bool> handshake_pair(net::EncryptionPolicy caller, net::EncryptionPolicy callee, std::string* error = nullptr) {
  net::Runtime runtime(2);
  net::Tcp server(runtime.executor()), client(runtime.executor());
  const auto address = server.listen("127.0.0.1:0");
  const auto alice = Identity::generate(), bob = Identity::generate();
  auto accepted = asio::co_spawn(server.get_executor(), accept_one(&server, &bob, callee), asio::use_future);
  auto dialed = asio::co_spawn(client.get_executor(), dial_one(&client, address, &alice, caller), asio::use_future);
  std::pair<bool, bool> out{false, false};
  std::string failure;
  try {
    const auto [conn, peer] = dialed.get();
    CHECK(peer == bob.peer_id());
    out.first = conn->encrypted();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  const auto [conn, peer] = accepted.get();
  CHECK(peer.empty() == !failure.empty());
  if (!peer.empty()) CHECK(peer == alice.peer_id());
  out.second = conn->encrypted();
  if (error) *error = failure;
  return out;
}

}  // namespace

TEST_CASE("encryption: a connection is encrypted exactly when both sides offer it") {
  CHECK(net::EncryptingConnection<net::Tcp::Connection>);
  CHECK_FALSE(net::EncryptingConnection<net::Simulated::connection_type>);
  CHECK(handshake_pair({}, {}) == std::pair{true, true});
  CHECK(handshake_pair({.offer = false}, {}) == std::pair{false, false});
  CHECK(handshake_pair({}, {.offer = false}) == std::pair{false, false});
  std::string error;
  CHECK(handshake_pair({.offer = true, .require = true}, {.offer = false}, &error) == std::pair{false, false});
  CHECK(error.find("require") != std::string::npos);

  // Both offers are signed: a hello whose offer was changed on the way fails the signature.
  const auto alice = Identity::generate(), bob = Identity::generate();
  net::Hello caller{alice.public_key(), net::random_nonce()};
  caller.kx = net::KxKey{};
  caller.ciphers = net::local_ciphers();
  const net::Hello callee{bob.public_key(), net::random_nonce(), {}, net::KxKey{}, {"chacha20poly1305"}};
  const auto signature = bob.sign(net::handshake_transcript('S', caller, callee));
  auto swapped = callee;
  (*swapped.kx)[0] ^= 1;
  CHECK_FALSE(verify_signature(bob.public_key(), net::handshake_transcript('S', caller, swapped), signature));
  auto downgraded = caller;
  downgraded.kx.reset();
  downgraded.ciphers.clear();
  CHECK_FALSE(verify_signature(bob.public_key(), net::handshake_transcript('S', downgraded, callee), signature));
  CHECK(net::agreed_cipher(caller, callee) == net::Cipher::chacha20poly1305);
  CHECK_FALSE(net::agreed_cipher(downgraded, callee));

  // An offer round-trips through its frame; a half offer is refused.
  const auto back = net::parse_hello(net::decode_frame(Buffer::adopt(net::encode_frame(net::hello_frame(caller, true)).flatten()), {}), true);
  CHECK(back.kx == caller.kx);
  CHECK(back.ciphers == caller.ciphers);
  auto half = net::hello_frame(caller, true);
  half.message.header.erase("ciphers");
  CHECK_THROWS_AS(net::parse_hello(half, true), Error);
}

TEST_CASE("encryption: calls of every size, both ways, many in flight, arrive intact") {
  test::Swarm<net::Tcp> swarm;
  auto a = swarm.make();
  auto b = swarm.make();
  for (auto* p : {&a, &b}) (*p)->add_handler("echo", test::echo);
  const auto at_a = a->listen("127.0.0.1:0");
  const auto at_b = b->listen("127.0.0.1:0");
  // Around a record (65536), a frame of one record plus its head, and several MiB.
  const std::vector<std::size_t> sizes{0, 1, 7, 65536 - 96, 65536, 65537, 131072 + 5, (5u << 20) + 3};
  std::vector<std::future<Message>> calls;
  std::vector<Message> sent;
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      for (const bool a_calls : {true, false}) {
        Message m{nlohmann::json{{"i", sent.size()}}, {}};
        m.add_blob(pattern_blob(sizes[i], static_cast<std::uint32_t>(sent.size())));
        if (i % 2 == 0) m.add_blob(pattern_blob(sizes[sizes.size() - 1 - i] % 70000, 7));  // two blobs, odd padding
        sent.push_back(m);
        auto& caller = a_calls ? a : b;
        calls.push_back(caller->async_call(a_calls ? at_b : at_a, "echo", std::move(m), Seconds(60), asio::use_future));
      }
    }
  }
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const Message reply = calls[i].get();
    CHECK(reply.header == sent[i].header);
    REQUIRE(reply.blobs.size() == sent[i].blobs.size());
    for (std::size_t j = 0; j < reply.blobs.size(); ++j) CHECK(reply.blobs[j] == sent[i].blobs[j]);
  }
  CHECK(a->connection_count() == 2);  // one each way, all calls multiplexed on them
  a->close();
  b->close();
}

TEST_CASE("encryption: a wire observer sees no plaintext, unless both sides turn encryption off") {
  std::string marker(64, '\0');
  for (std::size_t i = 0; i < marker.size(); ++i) marker[i] = static_cast<char>("hive-secret-marker:"[i % 19] ^ (i / 19));
  for (const bool encrypt : {true, false}) {
    CAPTURE(encrypt);
    test::Swarm<net::Tcp> swarm;
    auto server = swarm.make(net::RpcOptions().encrypt(encrypt));
    auto client = swarm.make(net::RpcOptions().encrypt(encrypt));
    server->add_handler("echo", test::echo);
    Proxy proxy(server->listen("127.0.0.1:0"));
    Message m{nlohmann::json{{"note", marker}}, {}};
    m.add_blob(Buffer::copy_of(std::string("prefix") + marker + "suffix"));
    const auto reply = client->call(proxy.address(), "echo", m, Seconds(20));
    CHECK(reply.blobs.at(0) == m.blobs.at(0));
    for (const auto d : {Proxy::to_callee, Proxy::to_caller}) {
      const auto wire = proxy.seen(d);
      CHECK(!wire.empty());
      CHECK((wire.find(marker) != std::string::npos) == !encrypt);
      CHECK((wire.find("echo") != std::string::npos) == (!encrypt && d == Proxy::to_callee));
    }
    client->close();
    server->close();
  }
}

TEST_CASE("encryption: an altered byte fails the call with an error, and the callee serves a fresh connection") {
  test::Swarm<net::Tcp> swarm;
  auto server = swarm.make();
  server->add_handler("echo", test::echo);
  const auto direct = server->listen("127.0.0.1:0");
  struct Case {
    Proxy::Direction direction;
    std::size_t offset;  // 0: a record's length field; 40: its ciphertext
  };
  for (const Case c : {Case{Proxy::to_callee, 0}, Case{Proxy::to_callee, 40}, Case{Proxy::to_caller, 0}, Case{Proxy::to_caller, 40}}) {
    CAPTURE(c.direction);
    CAPTURE(c.offset);
    Proxy proxy(direct);
    auto client = swarm.make();
    Message m{nlohmann::json{{"x", 1}}, {}};
    m.add_blob(pattern_blob(1000, 3));
    REQUIRE(client->call(proxy.address(), "echo", m, Seconds(20)).blobs.at(0) == m.blobs.at(0));
    proxy.tamper(c.direction, c.offset);
    std::error_code code;
    try {
      client->call(proxy.address(), "echo", m, Seconds(20));
    } catch (const std::system_error& e) {
      code = e.code();
      MESSAGE(std::string(e.what()));
    }
    CHECK(code);
    CHECK(code != make_error_code(errc::timeout));
    client->close();
  }
  auto fresh = swarm.make();
  Message m{nlohmann::json{{"x", 2}}, {}};
  m.add_blob(pattern_blob(200000, 4));
  CHECK(fresh->call(direct, "echo", m, Seconds(20)).blobs.at(0) == m.blobs.at(0));
  fresh->close();
  server->close();
}

TEST_CASE("encryption: records are standard AEAD: libsodium opens what hive seals, and hive opens what libsodium seals") {
  // Hive seals AES-256-GCM records with OpenSSL and ChaCha20-Poly1305 ones with libsodium; a
  // peer built on either library alone must read them. Record i is sealed under nonce i
  // (little-endian, 12 bytes) with the 4-byte length field as associated data.
  using Cipher = net::detail::RecordCipher;
  std::array<std::uint8_t, crypto_kx_SESSIONKEYBYTES> key{};
  randombytes_buf(key.data(), key.size());
  std::vector<net::Cipher> ciphers{net::Cipher::chacha20poly1305};
  if (crypto_aead_aes256gcm_is_available()) ciphers.push_back(net::Cipher::aes256gcm);
  else MESSAGE("this CPU lacks AES-NI: AES-256-GCM is not offered, and not checked here");
  for (const net::Cipher cipher : ciphers) {
    CAPTURE(net::cipher_name(cipher));
    const bool aes = cipher == net::Cipher::aes256gcm;
    Cipher sealer(cipher, key, Cipher::Direction::seal), opener(cipher, key, Cipher::Direction::open);
    std::uint64_t counter = 0;
    for (const std::size_t len : {std::size_t{1}, std::size_t{15}, std::size_t{16}, std::size_t{4097}, net::max_record_plaintext}) {
      CAPTURE(len);
      std::vector<std::byte> plain(len);
      for (std::size_t i = 0; i < len; ++i) plain[i] = static_cast<std::byte>(i * 31 + len);
      std::array<unsigned char, 12> nonce{};
      for (int i = 0; i < 8; ++i) nonce[i] = static_cast<unsigned char>(counter >> (8 * i));
      std::array<unsigned char, 4> length{static_cast<unsigned char>(len >> 24), static_cast<unsigned char>(len >> 16),
                                          static_cast<unsigned char>(len >> 8), static_cast<unsigned char>(len)};
      const auto* m = reinterpret_cast<const unsigned char*>(plain.data());

      // Hive seals; libsodium opens.
      std::vector<std::byte> record(len + net::record_overhead);
      sealer.seal(plain.data(), len, record.data());
      const auto* r = reinterpret_cast<const unsigned char*>(record.data());
      CHECK(std::equal(length.begin(), length.end(), r));
      std::vector<unsigned char> opened(len);
      const int rc = aes ? crypto_aead_aes256gcm_decrypt(opened.data(), nullptr, nullptr, r + 4, len + 16, r, 4, nonce.data(), key.data())
                         : crypto_aead_chacha20poly1305_ietf_decrypt(opened.data(), nullptr, nullptr, r + 4, len + 16, r, 4,
                                                                     nonce.data(), key.data());
      CHECK(rc == 0);
      CHECK(std::memcmp(opened.data(), plain.data(), len) == 0);

      // Libsodium seals; hive opens, and refuses the record once a bit of it flips.
      std::vector<unsigned char> theirs(len + net::record_overhead);
      std::copy(length.begin(), length.end(), theirs.begin());
      if (aes)
        crypto_aead_aes256gcm_encrypt(theirs.data() + 4, nullptr, m, len, length.data(), 4, nullptr, nonce.data(), key.data());
      else
        crypto_aead_chacha20poly1305_ietf_encrypt(theirs.data() + 4, nullptr, m, len, length.data(), 4, nullptr, nonce.data(),
                                                  key.data());
      CHECK(std::equal(theirs.begin(), theirs.end(), r, r + theirs.size()));  // same key and nonce: same bytes
      std::vector<std::byte> back(len);
      theirs[4 + len / 2] ^= 0x10;
      CHECK_FALSE(Cipher(cipher, key, Cipher::Direction::open).open(reinterpret_cast<const std::byte*>(theirs.data()), len, back.data()));
      theirs[4 + len / 2] ^= 0x10;
      CHECK(opener.open(reinterpret_cast<const std::byte*>(theirs.data()), len, back.data()));
      CHECK(back == plain);
      ++counter;
    }
    // The next record is sealed under the next nonce: one opened under another fails.
    std::vector<std::byte> plain(100, std::byte{9}), record(100 + net::record_overhead), back(100);
    sealer.seal(plain.data(), plain.size(), record.data());
    sealer.seal(plain.data(), plain.size(), record.data());
    CHECK_FALSE(opener.open(record.data(), plain.size(), back.data()));
    // Each cipher goes one way only.
    CHECK_THROWS_AS(opener.seal(plain.data(), plain.size(), record.data()), Error);
    CHECK_THROWS_AS(sealer.open(record.data(), plain.size(), back.data()), Error);
  }
}

TEST_CASE("encryption: a peer that requires it refuses plaintext peers clearly, either way") {
  test::Swarm<net::Tcp> swarm;
  auto strict = swarm.make(net::RpcOptions().require_encryption(true));
  auto plain = swarm.make(net::RpcOptions().encrypt(false));
  auto normal = swarm.make();
  for (auto* p : {&strict, &plain, &normal}) (*p)->add_handler("echo", test::echo);
  const auto at_strict = strict->listen("127.0.0.1:0");
  const auto at_plain = plain->listen("127.0.0.1:0");
  const auto at_normal = normal->listen("127.0.0.1:0");

  const auto inbound = test::error_of([&] { plain->call(at_strict, "echo", Message{}, Seconds(20)); });
  CHECK(inbound.find("encryption is required") != std::string::npos);
  const auto outbound = test::error_of([&] { strict->call(at_plain, "echo", Message{}, Seconds(20)); });
  CHECK(outbound.find("encryption is required") != std::string::npos);
  // A raw client that offers nothing is refused too.
  {
    test::RawClient raw(at_strict, "", 0, false);
    CHECK(test::error_of([&] { raw.handshake(Identity::generate()); }).find("encryption is required") != std::string::npos);
  }
  // Peers that offer it are served, and plaintext still works between peers that allow it.
  CHECK_NOTHROW(normal->call(at_strict, "echo", Message{}, Seconds(20)));
  CHECK_NOTHROW(strict->call(at_normal, "echo", Message{}, Seconds(20)));
  CHECK_NOTHROW(plain->call(at_normal, "echo", Message{}, Seconds(20)));
  CHECK_NOTHROW(normal->call(at_plain, "echo", Message{}, Seconds(20)));

  // Contradictory options fail at once.
  CHECK(test::error_of([&] { swarm.make(net::RpcOptions().encrypt(false).require_encryption(true)); })
            .find("require_encryption") != std::string::npos);
  for (auto* p : {&strict, &plain, &normal}) (*p)->close();
}

TEST_CASE("encryption: the simulated network works with the defaults and refuses require_encryption at once") {
  test::Swarm<net::Simulated> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("echo", test::echo);
  const auto address = server->listen(swarm.any_address);
  Message m{nlohmann::json{{"x", 1}}, {}};
  m.add_blob(pattern_blob(70000, 5));
  CHECK(client->call(address, "echo", m, Seconds(10)).blobs.at(0) == m.blobs.at(0));
  CHECK(test::error_of([&] { swarm.make(net::RpcOptions().require_encryption(true)); }).find("require_encryption") !=
        std::string::npos);
  server->close();
  client->close();
}
