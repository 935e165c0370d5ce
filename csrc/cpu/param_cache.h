// Per-channel data derived from a call's thresholds and centres by a search per channel, kept
// for the parameter sets met last.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// Every cache of this build, so that they can be counted and emptied together.
class ForgettingCache {
 public:
  virtual void forget() = 0;

 protected:
  ~ForgettingCache() = default;
};

struct CacheRegistry {
  std::mutex mutex;
  std::vector<ForgettingCache*> caches;
  std::atomic<int64_t> made{0};
  std::atomic<int64_t> reused{0};
};

// Constructed before the first cache (whose constructor registers it), so destroyed after all.
CacheRegistry& cache_registry() {
  static CacheRegistry registry;
  return registry;
}

// A layer's backward is called again and again with one parameter set (an attack's steps, a
// training run's), so a search per channel is paid once per set, not per call. Keyed by the
// parameters' bits, compared in full, so a changed parameter never meets another set's data.
template <typename Element>
class ParameterSetCache final : public ForgettingCache {
 public:
  using Value = std::vector<Element>;

  ParameterSetCache() {
    CacheRegistry& registry = cache_registry();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    registry.caches.push_back(this);
  }

  void forget() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = 0;
  }

  // p's data: kept, or made now (make() returns it) where p was met before (a repeat says more
  // calls will share it) or worth_making() says this call alone pays for it; else null, and p
  // is remembered as met. worth_making runs only where p's data is not kept.
  template <typename Worth, typename Make>
  std::shared_ptr<const Value> get(const ChannelParams& p, int64_t channels, Worth worth_making,
                                   Make make) {
    bool met = false;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto found = find(p, channels);
      if (found != entries_.end()) {
        entries_.splice(entries_.begin(), entries_, found);
        if (found->data) {
          cache_registry().reused.fetch_add(1, std::memory_order_relaxed);
          return found->data;
        }
        met = true;
      }
    }
    // Copied only here: a call that finds its set compares in place.
    Entry wanted{std::vector<float>(p.threshold, p.threshold + channels), p.center != nullptr,
                 nullptr};
    if (p.center) wanted.params.insert(wanted.params.end(), p.center, p.center + channels);
    if (met || worth_making()) {
      wanted.data = std::make_shared<const Value>(make());
      cache_registry().made.fetch_add(1, std::memory_order_relaxed);
    }
    std::shared_ptr<const Value> data = wanted.data;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = find(p, channels);
    if (found != entries_.end()) {
      bytes_ -= found->bytes();
      entries_.erase(found);
    }
    const size_t added = wanted.bytes();
    entries_.push_front(std::move(wanted));
    bytes_ += added;
    while (entries_.size() > 1 && (entries_.size() > kEntries || bytes_ > kBytes)) {
      bytes_ -= entries_.back().bytes();
      entries_.pop_back();
    }
    return data;
  }

 private:
  // More than the remapped layers of the models lipkern converts (a WideResNet-70-16: 69),
  // within a bound on memory for the widest parameter sets (per cache: one per kind of data).
  static constexpr size_t kEntries = 128;
  static constexpr size_t kBytes = size_t(32) << 20;
  struct Entry {
    std::vector<float> params;  // thresholds, then centres if any
    bool centred;
    std::shared_ptr<const Value> data;  // null: met once, not made

    size_t bytes() const {
      return params.size() * sizeof(float) + (data ? data->size() * sizeof(Element) : 0);
    }
  };

  typename std::list<Entry>::iterator find(const ChannelParams& p, int64_t channels) {
    const size_t n = static_cast<size_t>(channels);
    const bool centred = p.center != nullptr;
    return std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) {
      return e.centred == centred && e.params.size() == (centred ? 2 * n : n) &&
             std::memcmp(e.params.data(), p.threshold, n * sizeof(float)) == 0 &&
             (!centred || std::memcmp(e.params.data() + n, p.center, n * sizeof(float)) == 0);
    });
  }

  std::mutex mutex_;
  std::list<Entry> entries_;  // most recently used first
  size_t bytes_ = 0;
};

// One cache per kind of data (Kind: a type naming it, with the dtype and activation it
// depends on).
template <typename Element, typename Kind>
ParameterSetCache<Element>& parameter_set_cache() {
  static ParameterSetCache<Element> cache;
  return cache;
}

ParameterSetCounts parameter_set_counts() {
  const CacheRegistry& registry = cache_registry();
  return {registry.made.load(), registry.reused.load()};
}

void forget_parameter_sets() {
  CacheRegistry& registry = cache_registry();
  const std::lock_guard<std::mutex> lock(registry.mutex);
  for (ForgettingCache* cache : registry.caches) cache->forget();
  registry.made = 0;
  registry.reused = 0;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
