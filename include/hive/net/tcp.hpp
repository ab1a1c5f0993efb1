#pragma once
/// @file
/// net::Tcp: the transport over real TCP sockets (IPv4 and IPv6) on standalone Asio, with
/// optional encryption of each connection after its handshake (docs/protocol.md, "Encryption").

#include <hive/core/log.hpp>
#include <hive/net/handshake.hpp>
#include <hive/net/transport.hpp>

#include <asio/connect.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/ip/v6_only.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/write.hpp>
#include <openssl/evp.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace hive::net {

/// Run-time knobs of the TCP transport (Tcp::Options).
struct TcpOptions {
  /// Bounds on what this peer accepts from the network.
  HIVE_ARG(Limits, limits, Limits{});
  /// Size of each connection's read-ahead buffer; frames smaller than this need one read.
  HIVE_ARG(std::size_t, read_buffer_bytes, 64 * 1024);
  /// Kernel socket buffer size (SO_SNDBUF/SO_RCVBUF) in bytes; 0 keeps the system default.
  HIVE_ARG(int, socket_buffer_bytes, 0);
  /// Listen backlog.
  HIVE_ARG(int, backlog, 1024);
  /// Once a frame's first byte has arrived, the whole frame must arrive within this time plus
  /// its size at min_receive_rate; otherwise the connection closes (a sender that stalls
  /// mid-frame holds nothing for long).
  HIVE_ARG(Seconds, frame_timeout, Seconds(30));
  /// Slowest sending rate tolerated within a frame, in bytes per second (see frame_timeout).
  HIVE_ARG(double, min_receive_rate, 16.0 * 1024);
  /// A frame body larger than this is received into a buffer that grows as its bytes arrive
  /// (by growth_factor), so a size claimed in a frame prefix costs memory only once it is sent.
  HIVE_ARG(std::size_t, preallocate_bytes, std::size_t{1} << 20);
  /// How much a large body's buffer grows each time it fills (clamped to 2..64): growing
  /// copies about B / (growth_factor - 1) bytes of a B-byte body (a 64 MiB body: 9 MiB at 8,
  /// 63 MiB at 2), and a sender holds at most growth_factor times the bytes it has sent.
  HIVE_ARG(std::size_t, growth_factor, 8);
  /// Most bytes of large-body buffers (bodies past preallocate_bytes) the transport keeps for
  /// reuse once the messages holding them are gone, so that repeated large frames do not fault
  /// fresh pages in each time (a 64 MiB body: 16 384 page faults). 0 frees every buffer at once.
  HIVE_ARG(std::size_t, receive_cache_bytes, std::size_t{256} << 20);
  HIVE_OPTIONS_JSON(TcpOptions, limits, read_buffer_bytes, socket_buffer_bytes, backlog, frame_timeout,
                    min_receive_rate, preallocate_bytes, growth_factor, receive_cache_bytes)
};

/// Most plaintext bytes in one sealed record of an encrypted connection.
inline constexpr std::size_t max_record_plaintext = 65536;
/// Bytes a sealed record adds to its plaintext: a 4-byte length and a 16-byte tag.
inline constexpr std::size_t record_overhead = 4 + 16;

namespace detail {

// One direction of an encrypted connection: its key (for AES-256-GCM, expanded once into an
// OpenSSL context) and its record counter, which is the nonce. Wiped when destroyed.
//
// AES-256-GCM runs on OpenSSL's libcrypto (Debian's libssl-dev, which libasio-dev already
// depends on): on CPUs with VAES it seals and opens 2.4 to 2.9 times faster than libsodium's
// implementation (4.5 against 1.9 and 1.5 GB/s on this project's test machine). The records
// are standard AES-256-GCM either way. ChaCha20-Poly1305 stays on libsodium.
class RecordCipher {
 public:
  // Which way the records go: `seal` only seals, `open` only opens.
  enum class Direction : std::uint8_t { seal, open };

  RecordCipher(Cipher cipher, const std::array<std::uint8_t, crypto_kx_SESSIONKEYBYTES>& key, Direction direction)
      : direction_(direction) {
    static_assert(crypto_aead_chacha20poly1305_ietf_KEYBYTES == crypto_kx_SESSIONKEYBYTES && crypto_kx_SESSIONKEYBYTES == 32);
    static_assert(crypto_aead_chacha20poly1305_ietf_NPUBBYTES == 12 && crypto_aead_chacha20poly1305_ietf_ABYTES == 16);
    if (cipher == Cipher::aes256gcm) {
      aes_.reset(EVP_CIPHER_CTX_new());
      if (!aes_) throw std::bad_alloc();
      const int ok = direction_ == Direction::seal
                         ? EVP_EncryptInit_ex(aes_.get(), EVP_aes_256_gcm(), nullptr, key.data(), nullptr)
                         : EVP_DecryptInit_ex(aes_.get(), EVP_aes_256_gcm(), nullptr, key.data(), nullptr);
      if (ok != 1) throw Error(errc::connection_closed, "OpenSSL could not set up AES-256-GCM for an encrypted connection");
    } else {
      key_ = key;
    }
  }
  RecordCipher(const RecordCipher&) = delete;
  RecordCipher& operator=(const RecordCipher&) = delete;
  ~RecordCipher() { sodium_memzero(key_.data(), key_.size()); }  // EVP_CIPHER_CTX_free wipes the AES key

  // Writes the record of the `len` bytes at `plain` (1..max_record_plaintext) at `out`:
  // length, ciphertext, tag (len + record_overhead bytes).
  void seal(const std::byte* plain, std::size_t len, std::byte* out) {
    if (direction_ != Direction::seal) throw Error(errc::invalid_argument, "sealing with a record cipher set up to open");
    const auto nonce = next_nonce();
    auto* o = reinterpret_cast<unsigned char*>(out);
    o[0] = static_cast<unsigned char>(len >> 24);
    o[1] = static_cast<unsigned char>(len >> 16);
    o[2] = static_cast<unsigned char>(len >> 8);
    o[3] = static_cast<unsigned char>(len);
    const auto* m = reinterpret_cast<const unsigned char*>(plain);
    if (!aes_) {
      crypto_aead_chacha20poly1305_ietf_encrypt(o + 4, nullptr, m, len, o, 4, nullptr, nonce.data(), key_.data());
      return;
    }
    int n = 0, tail = 0;
    if (EVP_EncryptInit_ex(aes_.get(), nullptr, nullptr, nullptr, nonce.data()) != 1 ||
        EVP_EncryptUpdate(aes_.get(), nullptr, &n, o, 4) != 1 ||
        EVP_EncryptUpdate(aes_.get(), o + 4, &n, m, static_cast<int>(len)) != 1 ||
        EVP_EncryptFinal_ex(aes_.get(), o + 4 + n, &tail) != 1 ||
        EVP_CIPHER_CTX_ctrl(aes_.get(), EVP_CTRL_GCM_GET_TAG, 16, o + 4 + len) != 1)
      throw Error(errc::connection_closed, "OpenSSL could not seal a record of an encrypted connection");
  }

  // Opens the record at `in` whose length field says `len` into `plain`; false when its tag
  // does not verify (then `plain` holds garbage).
  bool open(const std::byte* in, std::size_t len, std::byte* plain) {
    if (direction_ != Direction::open) throw Error(errc::invalid_argument, "opening with a record cipher set up to seal");
    const auto nonce = next_nonce();
    const auto* c = reinterpret_cast<const unsigned char*>(in);
    auto* m = reinterpret_cast<unsigned char*>(plain);
    if (!aes_)
      return crypto_aead_chacha20poly1305_ietf_decrypt(m, nullptr, nullptr, c + 4, len + 16, c, 4, nonce.data(), key_.data()) == 0;
    // The tag is copied out: OpenSSL takes it as a non-const pointer.
    std::array<unsigned char, 16> tag;
    std::memcpy(tag.data(), c + 4 + len, tag.size());
    int n = 0, tail = 0;
    return EVP_DecryptInit_ex(aes_.get(), nullptr, nullptr, nullptr, nonce.data()) == 1 &&
           EVP_DecryptUpdate(aes_.get(), nullptr, &n, c, 4) == 1 &&
           EVP_DecryptUpdate(aes_.get(), m, &n, c + 4, static_cast<int>(len)) == 1 &&
           EVP_CIPHER_CTX_ctrl(aes_.get(), EVP_CTRL_GCM_SET_TAG, 16, tag.data()) == 1 &&
           EVP_DecryptFinal_ex(aes_.get(), m + n, &tail) == 1;
  }

 private:
  // The record counter, little-endian, zero-padded to 12 bytes.
  std::array<unsigned char, 12> next_nonce() {
    if (counter_ == ~std::uint64_t{0}) throw Error(errc::connection_closed, "an encrypted connection ran out of record numbers");
    std::array<unsigned char, 12> nonce{};
    for (int i = 0; i < 8; ++i) nonce[i] = static_cast<unsigned char>(counter_ >> (8 * i));
    ++counter_;
    return nonce;
  }

  struct FreeContext {
    void operator()(EVP_CIPHER_CTX* ctx) const noexcept { EVP_CIPHER_CTX_free(ctx); }
  };

  Direction direction_;
  std::array<std::uint8_t, crypto_kx_SESSIONKEYBYTES> key_{};
  std::unique_ptr<EVP_CIPHER_CTX, FreeContext> aes_;
  std::uint64_t counter_ = 0;
};

// Buffers for large frame bodies, shared by a transport's connections: a buffer comes back
// here when the last reference to it drops (the message, or a tensor decoded from it), and
// the next body of its size class reuses it, its pages already faulted in. Holds at most
// `capacity` bytes; beyond that, released buffers are freed. Thread-safe: references may
// drop on any thread.
class BodyCache : public std::enable_shared_from_this<BodyCache> {
 public:
  explicit BodyCache(std::size_t capacity) : capacity_(capacity) {}
  BodyCache(const BodyCache&) = delete;
  BodyCache& operator=(const BodyCache&) = delete;
  ~BodyCache() {
    for (auto& [size, blocks] : free_)
      for (std::byte* b : blocks) ::operator delete(b, alignment);
  }

  // The size a request for `n` bytes gets: n rounded up to an eighth of its power of two
  // (at most 12.5% more), so that bodies of similar sizes share buffers.
  static std::size_t size_class(std::size_t n) noexcept {
    if (n <= 16) return 16;
    const int shift = static_cast<int>(std::bit_width(n - 1)) - 4;
    const std::size_t step = std::size_t{1} << std::max(shift, 0);
    return (n + step - 1) / step * step;
  }

  // A buffer of at least `n` bytes, 64-byte aligned, returned here when its last owner lets
  // go. Throws std::bad_alloc.
  std::shared_ptr<std::byte[]> get(std::size_t n) {
    const std::size_t size = size_class(n);
    std::byte* block = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (auto it = free_.find(size); it != free_.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        cached_ -= size;
      }
    }
    if (!block) block = static_cast<std::byte*>(::operator new(size, alignment));
    return {block, [self = shared_from_this(), size](std::byte* p) { self->put(p, size); }};
  }

  // Bytes held for reuse now.
  [[nodiscard]] std::size_t cached_bytes() const {
    std::lock_guard lock(mutex_);
    return cached_;
  }

 private:
  static constexpr std::align_val_t alignment{64};

  void put(std::byte* p, std::size_t size) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (cached_ + size <= capacity_) {
        try {
          free_[size].push_back(p);
          cached_ += size;
          return;
        } catch (...) {  // no room to remember it: free it below
        }
      }
    }
    ::operator delete(p, alignment);
  }

  std::size_t capacity_;
  mutable std::mutex mutex_;
  std::size_t cached_ = 0;
  std::map<std::size_t, std::vector<std::byte*>> free_;
};

}  // namespace detail

/// The TCP transport: frames over persistent TCP connections (TCP_NODELAY), with a read-ahead
/// buffer so that small frames cost one system call and large payloads are read straight into
/// their final buffer. Send buffers are written with scatter-gather I/O, without copying blobs.
/// After start_encryption (which the handshake calls when both sides offer it), a connection
/// carries sealed records instead (docs/protocol.md, "Encryption"): one copy per direction,
/// sealed in batches of up to 1 MiB, opened straight into a frame's body where it fits.
/// Buffers of large bodies are reused once their messages are gone (receive_cache_bytes).
///
/// @par Thread safety
/// All operations must run on get_executor() (the RPC layer does so).
class Tcp {
 public:
  /// Run-time knobs of the TCP transport.
  using Options = TcpOptions;

  /// The strand every operation of this transport runs on.
  using executor_type = asio::strand<asio::any_io_executor>;

  /// One TCP connection carrying frames.
  class Connection : public std::enable_shared_from_this<Connection> {
   public:
    /// Wraps a connected socket. Large frame bodies come from `cache` when given (the
    /// transport shares one among its connections), else from the heap.
    Connection(asio::ip::tcp::socket socket, const Options& options, std::shared_ptr<detail::BodyCache> cache = nullptr)
        : socket_(std::move(socket)),
          cache_(std::move(cache)),
          limits_(options.limits()),
          frame_timeout_(options.frame_timeout()),
          min_rate_(options.min_receive_rate()),
          preallocate_(std::max<std::size_t>(options.preallocate_bytes(), 1)),
          growth_(std::clamp<std::size_t>(options.growth_factor(), 2, 64)),
          rbuf_(std::max<std::size_t>(options.read_buffer_bytes(), prefix_bytes)),
          watchdog_(socket_.get_executor()) {
      std::error_code ec;
      socket_.set_option(asio::ip::tcp::no_delay(true), ec);
      if (options.socket_buffer_bytes() > 0) {
        socket_.set_option(asio::socket_base::send_buffer_size(options.socket_buffer_bytes()), ec);
        socket_.set_option(asio::socket_base::receive_buffer_size(options.socket_buffer_bytes()), ec);
      }
      auto ep = socket_.remote_endpoint(ec);
      if (!ec) remote_ = HostPort{ep.address().to_string(), ep.port()}.str();
    }

    /// Reads and decodes the next frame. Waiting for a frame to start has no time limit (the
    /// RPC layer closes idle connections); once it started it must end within frame_timeout
    /// plus its size at min_receive_rate, or this throws hive::Error(errc::timeout). On an
    /// encrypted connection a record that is malformed or fails authentication throws a fatal
    /// FrameError.
    asio::awaitable<Frame> read_frame() {
      co_await wait_first_byte();
      arm_watchdog(prefix_bytes);
      try {
        co_await fill(prefix_bytes);
        const auto prefix = parse_prefix(std::span<const std::byte, prefix_bytes>(head(), prefix_bytes), limits_);
        consume(prefix_bytes);
        const std::uint64_t rest = prefix.rest_bytes();
        arm_watchdog(prefix.frame_bytes);
        const std::size_t have = std::min<std::uint64_t>(rest, available());
        // Small bodies get their final buffer at once; a large one grows as its bytes arrive,
        // in buffers from the cache.
        const bool large = rest > preallocate_;
        const auto allocate = [&](std::uint64_t n) {
          return large && cache_ ? cache_->get(n) : std::make_shared_for_overwrite<std::byte[]>(std::max<std::uint64_t>(n, 1));
        };
        std::uint64_t capacity = large ? std::max<std::uint64_t>(preallocate_, have) : rest;
        auto storage = allocate(capacity);
        if (have > 0) std::memcpy(storage.get(), head(), have);
        consume(have);
        std::uint64_t got = have;
        while (got < rest) {
          if (got == capacity) {
            const std::uint64_t grown = std::min<std::uint64_t>(rest, capacity * growth_);
            auto bigger = allocate(grown);
            std::memcpy(bigger.get(), storage.get(), got);
            storage = std::move(bigger);
            capacity = grown;
          }
          const std::size_t n = co_await read_some(storage.get() + got, capacity - got);
          got += n;
        }
        disarm_watchdog();
        const std::byte* data = storage.get();
        co_return decode_frame_rest(prefix, Buffer(std::move(storage), data, rest), limits_);
      } catch (const std::system_error&) {
        disarm_watchdog();
        if (!timed_out_) throw;
        throw Error(errc::timeout, fmt::format("{}: a frame did not arrive within its time limit", remote_));
      }
    }

    /// Writes one encoded frame: with a single gathered write, or on an encrypted connection
    /// as sealed records in writes of up to 1 MiB.
    asio::awaitable<void> write_frame(const EncodedFrame& f) {
      if (encrypted_) {
        co_await write_sealed(f);
        co_return;
      }
      std::vector<asio::const_buffer> bufs;
      bufs.reserve(1 + 2 * f.blobs.size());
      bufs.emplace_back(f.head.data(), f.head.size());
      for (std::size_t i = 0; i < f.blobs.size(); ++i) {
        if (!f.blobs[i].empty()) bufs.emplace_back(f.blobs[i].data(), f.blobs[i].size());
        if (f.padding[i]) bufs.emplace_back(detail::zero_padding.data(), f.padding[i]);
      }
      co_await asio::async_write(socket_, bufs, asio::use_awaitable);
    }

    /// Switches both directions to sealed records under `keys` (docs/protocol.md,
    /// "Encryption"): every byte written from now on is sealed, and every byte read after the
    /// frames already returned is opened, including bytes already in the read-ahead buffer.
    /// Called by the handshake, between frames.
    void start_encryption(const SessionKeys& keys) {
      seal_ = std::make_unique<detail::RecordCipher>(keys.cipher, keys.tx, detail::RecordCipher::Direction::seal);
      open_ = std::make_unique<detail::RecordCipher>(keys.cipher, keys.rx, detail::RecordCipher::Direction::open);
      encrypted_ = true;
      // The read-ahead buffer now holds ciphertext and must take a whole record.
      if (rbuf_.size() < max_record_plaintext + record_overhead) rbuf_.resize(max_record_plaintext + record_overhead);
      pbuf_.resize(max_record_plaintext + prefix_bytes);
      pbegin_ = pend_ = 0;
    }

    /// True once the connection is encrypted (start_encryption ran).
    [[nodiscard]] bool encrypted() const noexcept { return encrypted_; }

    /// Closes the socket, failing any read or write in flight, and wipes the session keys.
    void close() noexcept {
      std::error_code ec;
      socket_.shutdown(asio::socket_base::shutdown_both, ec);
      socket_.close(ec);
      seal_.reset();
      open_.reset();
    }

    /// The remote endpoint as "host:port".
    [[nodiscard]] std::string remote_address() const { return remote_; }

    /// True while a frame is partly received (the RPC layer does not close such a connection
    /// as idle; the frame's own time limit bounds it).
    [[nodiscard]] bool receiving() const noexcept { return receiving_; }

   private:
    // Closes the socket unless the frame being read ends within its allowance.
    void arm_watchdog(std::uint64_t frame_bytes) {
      receiving_ = true;
      const double allowance = std::min(1e7, frame_timeout_.count() + (min_rate_ > 0 ? static_cast<double>(frame_bytes) / min_rate_ : 0.0));
      watchdog_.expires_at(deadline_after(Seconds(allowance)));
      const auto generation = ++watchdog_generation_;
      watchdog_.async_wait([weak = this->weak_from_this(), generation](std::error_code ec) {
        auto self = weak.lock();
        if (ec || !self || self->watchdog_generation_ != generation) return;
        self->timed_out_ = true;
        std::error_code ignored;
        self->socket_.close(ignored);
      });
    }
    void disarm_watchdog() {
      receiving_ = false;
      ++watchdog_generation_;
      watchdog_.cancel();
    }

    // The plaintext read ahead: frame bytes not yet consumed (decrypted ones when encrypted).
    std::byte* head() noexcept { return encrypted_ ? pbuf_.data() + pbegin_ : rbuf_.data() + begin_; }
    [[nodiscard]] std::size_t available() const noexcept { return encrypted_ ? pend_ - pbegin_ : end_ - begin_; }
    void consume(std::size_t n) noexcept { (encrypted_ ? pbegin_ : begin_) += n; }

    // Returns once a frame has started to arrive (a byte of it, or of its record, is here).
    asio::awaitable<void> wait_first_byte() {
      if (available() > 0) co_return;
      co_await fill_raw(1);
    }

    // Ensures `n` plaintext bytes (n <= prefix_bytes when encrypted) are read ahead at head().
    asio::awaitable<void> fill(std::size_t n) {
      if (!encrypted_) {
        co_await fill_raw(n);
        co_return;
      }
      while (pend_ - pbegin_ < n) {
        if (pbegin_ > 0) {
          std::memmove(pbuf_.data(), pbuf_.data() + pbegin_, pend_ - pbegin_);
          pend_ -= pbegin_;
          pbegin_ = 0;
        }
        const std::size_t len = co_await next_record();
        open_record(pbuf_.data() + pend_, len);
        pend_ += len;
      }
    }

    // Reads up to `max` (> 0) body bytes into `dst`; returns how many.
    asio::awaitable<std::size_t> read_some(std::byte* dst, std::size_t max) {
      if (!encrypted_) {
        const std::size_t n = co_await socket_.async_read_some(asio::buffer(dst, max), asio::use_awaitable);
        co_return n;
      }
      if (pend_ > pbegin_) {
        const std::size_t n = std::min(max, pend_ - pbegin_);
        std::memcpy(dst, pbuf_.data() + pbegin_, n);
        pbegin_ += n;
        co_return n;
      }
      pbegin_ = pend_ = 0;
      const std::size_t len = co_await next_record();
      if (len <= max) {
        open_record(dst, len);  // straight into the frame's body
        co_return len;
      }
      // The record runs past this buffer: open it aside and hand over what fits.
      open_record(pbuf_.data(), len);
      std::memcpy(dst, pbuf_.data(), max);
      pbegin_ = max;
      pend_ = len;
      co_return max;
    }

    // Waits until a whole sealed record is read ahead; returns its plaintext length.
    asio::awaitable<std::size_t> next_record() {
      co_await fill_raw(4);
      const auto* p = reinterpret_cast<const unsigned char*>(rbuf_.data() + begin_);
      const std::size_t len = (std::size_t{p[0]} << 24) | (std::size_t{p[1]} << 16) | (std::size_t{p[2]} << 8) | p[3];
      if (len == 0 || len > max_record_plaintext)
        throw FrameError(errc::bad_frame,
                         fmt::format("{}: a sealed record of {} bytes (1 to {} allowed)", remote_, len, max_record_plaintext), 0, true);
      co_await fill_raw(len + record_overhead);
      co_return len;
    }

    // Opens the record read ahead (next_record said `len`) into `dst` and consumes it.
    void open_record(std::byte* dst, std::size_t len) {
      if (!open_) throw Error(errc::connection_closed, fmt::format("{}: the connection is closed", remote_));
      if (!open_->open(rbuf_.data() + begin_, len, dst))
        throw FrameError(errc::bad_frame,
                         fmt::format("{}: a sealed record failed authentication (altered on the way, or not from the peer)", remote_),
                         0, true);
      begin_ += len + record_overhead;
    }

    // Seals the frame's bytes as records of up to max_record_plaintext bytes, small pieces
    // (head, padding, short blobs) gathered into one record, and writes them in batches.
    asio::awaitable<void> write_sealed(const EncodedFrame& f) {
      const std::uint64_t total = f.size();
      const std::uint64_t records = (total + max_record_plaintext - 1) / max_record_plaintext;
      const std::size_t batch = std::min<std::uint64_t>(total + records * record_overhead, write_batch_bytes);
      auto out = std::make_unique_for_overwrite<std::byte[]>(batch);
      auto gather = std::make_unique_for_overwrite<std::byte[]>(std::min<std::uint64_t>(total, max_record_plaintext));
      std::size_t used = 0, pending = 0;
      std::uint64_t unsealed = total;
      std::vector<std::span<const std::byte>> pieces;
      pieces.reserve(1 + 2 * f.blobs.size());
      pieces.emplace_back(f.head.data(), f.head.size());
      for (std::size_t i = 0; i < f.blobs.size(); ++i) {
        pieces.emplace_back(f.blobs[i].data(), f.blobs[i].size());
        pieces.emplace_back(detail::zero_padding.data(), f.padding[i]);
      }
      for (const auto& piece : pieces) {
        const std::byte* p = piece.data();
        std::size_t n = piece.size();
        while (n > 0) {
          if (!seal_) throw Error(errc::connection_closed, fmt::format("{}: the connection is closed", remote_));
          if (pending == 0 && n >= max_record_plaintext) {
            seal_->seal(p, max_record_plaintext, out.get() + used);  // straight from the blob
            used += max_record_plaintext + record_overhead;
            unsealed -= max_record_plaintext;
            p += max_record_plaintext;
            n -= max_record_plaintext;
          } else {
            const std::size_t take = std::min(n, max_record_plaintext - pending);
            std::memcpy(gather.get() + pending, p, take);
            pending += take;
            p += take;
            n -= take;
            if (pending == max_record_plaintext || pending == unsealed) {
              seal_->seal(gather.get(), pending, out.get() + used);
              used += pending + record_overhead;
              unsealed -= pending;
              pending = 0;
            }
          }
          // Write the batch when the next record might not fit behind it.
          if (used > 0 && batch - used < std::min<std::uint64_t>(unsealed, max_record_plaintext) + record_overhead) {
            co_await asio::async_write(socket_, asio::buffer(out.get(), used), asio::use_awaitable);
            used = 0;
          }
        }
      }
      if (used > 0) co_await asio::async_write(socket_, asio::buffer(out.get(), used), asio::use_awaitable);
    }

    // Ensures `n` raw bytes (n <= rbuf_.size()) are read ahead at begin_.
    asio::awaitable<void> fill_raw(std::size_t n) {
      if (end_ - begin_ >= n) co_return;
      if (begin_ > 0) {
        std::memmove(rbuf_.data(), rbuf_.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
      }
      while (end_ < n)
        end_ += co_await socket_.async_read_some(asio::buffer(rbuf_.data() + end_, rbuf_.size() - end_), asio::use_awaitable);
    }

    asio::ip::tcp::socket socket_;
    std::shared_ptr<detail::BodyCache> cache_;
    Limits limits_;
    Seconds frame_timeout_;
    double min_rate_;
    std::uint64_t preallocate_;
    std::uint64_t growth_;
    std::vector<std::byte> rbuf_;
    std::size_t begin_ = 0, end_ = 0;
    std::string remote_;
    asio::steady_timer watchdog_;
    std::uint64_t watchdog_generation_ = 0;
    bool timed_out_ = false;
    bool receiving_ = false;
    // Encryption (start_encryption): one cipher per direction, reset (wiped) by close().
    static constexpr std::size_t write_batch_bytes = std::size_t{1} << 20;
    bool encrypted_ = false;
    std::unique_ptr<detail::RecordCipher> seal_, open_;
    std::vector<std::byte> pbuf_;  // opened plaintext read ahead
    std::size_t pbegin_ = 0, pend_ = 0;
  };
  /// The connection type (net::Connection).
  using connection_type = Connection;

  /// A transport whose operations run on a new strand of `executor`.
  explicit Tcp(const asio::any_io_executor& executor, Options options = {})
      : strand_(asio::make_strand(executor)),
        options_(std::move(options)),
        acceptor_(strand_),
        cache_(options_.receive_cache_bytes() > 0 ? std::make_shared<detail::BodyCache>(options_.receive_cache_bytes()) : nullptr) {}

  /// The strand this transport runs on.
  [[nodiscard]] executor_type get_executor() const noexcept { return strand_; }
  /// The limits applied to incoming frames.
  [[nodiscard]] const Limits& limits() const noexcept { return options_.limits(); }
  /// The options this transport was built with.
  [[nodiscard]] const Options& options() const noexcept { return options_; }

  /// Binds and listens on "host:port" (port 0 picks a free port); returns the bound address.
  /// Throws hive::Error(bad_address) or std::system_error.
  std::string listen(std::string_view address) {
    auto hp = HostPort::parse(address);
    asio::ip::tcp::resolver resolver(strand_);
    auto results = resolver.resolve(hp.host, std::to_string(hp.port), asio::ip::resolver_base::passive);
    const asio::ip::tcp::endpoint ep = *results.begin();
    acceptor_.open(ep.protocol());
    acceptor_.set_option(asio::socket_base::reuse_address(true));
    if (ep.address().is_v6()) {
      std::error_code ignored;  // dual-stack where the system allows it; plain v6 otherwise
      acceptor_.set_option(asio::ip::v6_only(false), ignored);
    }
    acceptor_.bind(ep);
    acceptor_.listen(options_.backlog());
    auto local = acceptor_.local_endpoint();
    return HostPort{local.address().to_string(), local.port()}.str();
  }

  /// Waits for the next incoming connection.
  asio::awaitable<std::shared_ptr<Connection>> accept() {
    auto socket = co_await acceptor_.async_accept(asio::use_awaitable);
    co_return std::make_shared<Connection>(std::move(socket), options_, cache_);
  }

  /// Connects to "host:port" before `deadline`; throws hive::Error(timeout) or std::system_error.
  asio::awaitable<std::shared_ptr<Connection>> connect(std::string address, Deadline deadline) {
    using namespace hive::detail;
    auto hp = HostPort::parse(address);
    asio::ip::tcp::resolver resolver(strand_);
    auto endpoints = co_await resolver.async_resolve(hp.host, std::to_string(hp.port), asio::use_awaitable);
    asio::ip::tcp::socket socket(strand_);
    asio::steady_timer timer(strand_, deadline);
    auto result = co_await (asio::async_connect(socket, endpoints, as_tuple_awaitable) ||
                            timer.async_wait(as_tuple_awaitable));
    if (result.index() == 1) throw Error(errc::timeout, fmt::format("connecting to {} timed out", address));
    auto [ec, ep] = std::get<0>(result);
    if (ec == asio::error::connection_refused) throw Error(errc::connection_refused, fmt::format("connection to {} refused", address));
    if (ec) throw std::system_error(ec, fmt::format("connecting to {}", address));
    co_return std::make_shared<Connection>(std::move(socket), options_, cache_);
  }

  /// Stops accepting connections.
  void close() {
    std::error_code ec;
    acceptor_.close(ec);
  }

  /// Bytes of large-body buffers held for reuse now (at most Options::receive_cache_bytes).
  [[nodiscard]] std::size_t cached_receive_bytes() const { return cache_ ? cache_->cached_bytes() : 0; }

 private:
  executor_type strand_;
  Options options_;
  asio::ip::tcp::acceptor acceptor_;
  std::shared_ptr<detail::BodyCache> cache_;
};

static_assert(Transport<Tcp>);

}  // namespace hive::net
