// The memory floor of bandadv's CPU op at 1M groups of 16 (issue 14): how long the op's memory
// traffic takes with none of its arithmetic, against a copy of the rewards, timed side by side.
//
//   gcc -O2 -mavx2 -fopenmp benchmarks/memory_floor.c -o /tmp/memory_floor && OMP_NUM_THREADS=2 /tmp/memory_floor
//
// Three passes, run one after another in each of 15 rounds, the minimum of each printed:
// - memcpy: the rewards (64 MB) copied by glibc's memcpy, an equal part per thread;
// - vector copy: the same with 32-byte loads and ordinary stores, as torch's copy_ does (the
//   baseline of `python -m bandadv bench`'s 1M row);
// - the op's bytes: what the op reads and writes with `out=` at this size, into buffers laid out
//   as its outputs are, with only a group mean computed: per group 16 rewards read, 16
//   advantages and 16 mask bytes streamed past the caches (as the kernel does above 8 MB); per
//   tile of 64 groups the eight 4-byte per-group rows (six statistics, count, reason) and the
//   group mask written with ordinary stores, 256 and 64 bytes at a time.
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kGroups = 1 << 20, kSize = 16, kTile = 64, kRows = 8, kRounds = 15 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void cpu_name(char* out, size_t size) {
  snprintf(out, size, "unknown CPU");
  FILE* f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[256];
  while (fgets(line, sizeof line, f)) {
    char* colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) == 0 && colon) {
      snprintf(out, size, "%s", colon + 2);
      out[strcspn(out, "\n")] = 0;
      break;
    }
  }
  fclose(f);
}

int main(void) {
  const size_t n = (size_t)kGroups * kSize;
  float* rewards = aligned_alloc(64, n * 4);
  float* copy = aligned_alloc(64, n * 4);
  float* advantages = aligned_alloc(64, n * 4);
  uint8_t* mask = aligned_alloc(64, n);
  float* rows = aligned_alloc(64, (size_t)kGroups * kRows * 4);
  uint8_t* group_mask = aligned_alloc(64, kGroups);
  for (size_t i = 0; i < n; ++i) rewards[i] = (float)rand() / RAND_MAX;
  // Every output touched once first, as `out=` buffers are.
  memset(copy, 0, n * 4);
  memset(advantages, 0, n * 4);
  memset(mask, 0, n);
  memset(rows, 0, (size_t)kGroups * kRows * 4);
  memset(group_mask, 0, kGroups);

  double best[3] = {1e9, 1e9, 1e9};
  for (int round = 0; round < kRounds; ++round) {
    double t[4];
    t[0] = now();
#pragma omp parallel
    {
      const int threads = omp_get_num_threads(), id = omp_get_thread_num();
      const size_t part = n / threads, at = part * id;
      memcpy(copy + at, rewards + at, (id == threads - 1 ? n - at : part) * 4);
    }
    t[1] = now();
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i += 8) _mm256_store_ps(copy + i, _mm256_load_ps(rewards + i));
    t[2] = now();
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
      for (int first = 0; first < kGroups; first += kTile) {
        float tile[kRows][kTile] __attribute__((aligned(64)));
        uint8_t kept[kTile];
        for (int g = first; g < first + kTile; ++g) {
          const float* r = rewards + (size_t)g * kSize;
          const __m256 lo = _mm256_load_ps(r), hi = _mm256_load_ps(r + 8);
          const __m256 s = _mm256_add_ps(lo, hi);
          __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
          h = _mm_hadd_ps(h, h);
          h = _mm_hadd_ps(h, h);
          const float mean = _mm_cvtss_f32(h) / kSize;
          const __m256 m = _mm256_set1_ps(mean);
          _mm256_stream_ps(advantages + (size_t)g * kSize, _mm256_sub_ps(lo, m));
          _mm256_stream_ps(advantages + (size_t)g * kSize + 8, _mm256_sub_ps(hi, m));
          _mm_stream_si128((__m128i*)(mask + (size_t)g * kSize), _mm_set1_epi8(1));
          for (int k = 0; k < kRows; ++k) tile[k][g - first] = mean + k;
          kept[g - first] = mean > 0.5f;
        }
        for (int k = 0; k < kRows; ++k) memcpy(rows + (size_t)k * kGroups + first, tile[k], sizeof tile[k]);
        memcpy(group_mask + first, kept, sizeof kept);
      }
      _mm_sfence();  // each thread's streamed stores, before the pass counts as done
    }
    t[3] = now();
    for (int k = 0; k < 3; ++k) best[k] = t[k + 1] - t[k] < best[k] ? t[k + 1] - t[k] : best[k];
  }
  char cpu[128];
  cpu_name(cpu, sizeof cpu);
  printf("%s, %d threads, 1M groups of 16, min of %d rounds\n", cpu, omp_get_max_threads(), kRounds);
  printf("memcpy %.2f ms, vector copy %.2f ms, the op's bytes without its arithmetic %.2f ms: "
         "%.2fx the vector copy, %.2fx memcpy\n",
         best[0] * 1e3, best[1] * 1e3, best[2] * 1e3, best[2] / best[1], best[2] / best[0]);
  return 0;
}
