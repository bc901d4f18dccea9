// Peak arithmetic rate of this CPU's cores, for the benchmarks' roofline (benchmarks/common.py
// compiles and runs it): independent chains of fp32 fused multiply-adds on the widest vectors the
// CPU has (AVX-512, else AVX2+FMA), and of bf16 dot products (vdpbf16ps, AVX512-BF16 CPUs), with
// no memory traffic. 14 accumulators hide the FMA latency (4 cycles, 2 pipes). The rate is what
// the cores sustain at the clock they run at, which in a VM /proc/cpuinfo does not tell.
//
// Usage: fma_peak THREADS [SECONDS_PER_REPETITION]   (MOE_FRAMEWORK_CPU_NO_AVX512=1: AVX2 only)
// Prints one JSON object: {"threads": T, "fp32_isa": "avx512f"|"avx2"|null, "fp32_gflops": x|null,
// "bf16_gflops": y|null}. GFLOP/s count 2 per multiply-add (a bf16 pair product-sum is 4), summed
// over the T threads running at once, best of 5 repetitions.
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum kernel { kNone, kFp32Zmm, kFp32Ymm, kBf16Zmm };

// One iteration = 14 independent vector operations.
static double flops_per_iter(enum kernel k) {
  switch (k) {
    case kFp32Zmm:
      return 14.0 * 16 * 2;
    case kFp32Ymm:
      return 14.0 * 8 * 2;
    case kBf16Zmm:
      return 14.0 * 32 * 2;
    default:
      return 0;
  }
}

#if defined(__x86_64__)
#define CHAINS(op, w) \
  ".irp r,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n " op " %%" w "0,%%" w "1,%%" w "\\r\n .endr\n"
#define LOOP(op, w, iters)                                                                   \
  __asm__ volatile(                                                                          \
      "vxorps %%xmm0,%%xmm0,%%xmm0\n vxorps %%xmm1,%%xmm1,%%xmm1\n"                          \
      "mov %0, %%rcx\n"                                                                      \
      "1:\n" CHAINS(op, w) "dec %%rcx\n jnz 1b\n vzeroupper\n"                               \
      :                                                                                      \
      : "r"(iters)                                                                           \
      : "rcx", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

static void run_kernel(enum kernel k, long iters) {
  switch (k) {
    case kFp32Zmm:
      LOOP("vfmadd231ps", "zmm", iters);
      break;
    case kFp32Ymm:
      LOOP("vfmadd231ps", "ymm", iters);
      break;
    case kBf16Zmm:
      LOOP("vdpbf16ps", "zmm", iters);
      break;
    default:
      break;
  }
}

// MOE_FRAMEWORK_CPU_NO_AVX512 (the library's switch, csrc/include/moe_framework/cpu_isa.h) measures
// what its AVX2 kernels can reach instead: ymm FMAs, no bf16 dot products.
static int avx512_allowed(void) {
  return getenv("MOE_FRAMEWORK_CPU_NO_AVX512") == NULL;
}

static enum kernel fp32_kernel(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && avx512_allowed()) return kFp32Zmm;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kFp32Ymm;
  return kNone;
}

static enum kernel bf16_kernel(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && avx512_allowed() ? kBf16Zmm : kNone;
}
#else
static void run_kernel(enum kernel k, long iters) {
  (void)k;
  (void)iters;
}
static enum kernel fp32_kernel(void) {
  return kNone;
}
static enum kernel bf16_kernel(void) {
  return kNone;
}
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

struct shared {
  pthread_barrier_t start, stop;
  enum kernel kernel;
  long iters;
  int reps;
};

static void* worker(void* arg) {
  struct shared* s = arg;
  for (int r = 0; r < s->reps; ++r) {
    pthread_barrier_wait(&s->start);
    run_kernel(s->kernel, s->iters);
    pthread_barrier_wait(&s->stop);
  }
  return NULL;
}

// GFLOP/s of `threads` threads running kernel k at once: iterations calibrated on one thread to
// about `seconds` per repetition, best of 5 repetitions (the time from the common start to the
// last thread's end).
static double measure(enum kernel k, int threads, double seconds) {
  if (k == kNone) return -1;
  long iters = 1000000;
  for (;;) {
    double t0 = now();
    run_kernel(k, iters);
    double dt = now() - t0;
    if (dt > 0.02 || iters > (1L << 40)) {
      iters = (long)((double)iters * seconds / dt) + 1;
      break;
    }
    iters *= 8;
  }
  struct shared s;
  s.kernel = k;
  s.iters = iters;
  s.reps = 5;
  pthread_barrier_init(&s.start, NULL, (unsigned)threads);
  pthread_barrier_init(&s.stop, NULL, (unsigned)threads);
  pthread_t* tids = calloc((size_t)threads, sizeof(pthread_t));
  if (tids == NULL) return -1;
  for (int i = 1; i < threads; ++i) {
    if (pthread_create(&tids[i], NULL, worker, &s) != 0) {
      fprintf(stderr, "fma_peak: pthread_create failed for thread %d\n", i);
      exit(1);
    }
  }
  double best = 0;
  for (int r = 0; r < s.reps; ++r) {
    pthread_barrier_wait(&s.start);
    double t0 = now();
    run_kernel(k, iters);
    pthread_barrier_wait(&s.stop);
    double rate = flops_per_iter(k) * (double)iters * threads / (now() - t0) / 1e9;
    if (rate > best) best = rate;
  }
  for (int i = 1; i < threads; ++i) pthread_join(tids[i], NULL);
  free(tids);
  pthread_barrier_destroy(&s.start);
  pthread_barrier_destroy(&s.stop);
  return best;
}

static void print_rate(const char* key, double v) {
  if (v < 0) {
    printf("\"%s\": null", key);
  } else {
    printf("\"%s\": %.2f", key, v);
  }
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s THREADS [SECONDS_PER_REPETITION]\n", argv[0]);
    return 2;
  }
  char* end = NULL;
  errno = 0;
  long threads = strtol(argv[1], &end, 10);
  if (errno != 0 || *end != '\0' || threads < 1 || threads > 4096) {
    fprintf(stderr, "fma_peak: THREADS must be an integer in [1, 4096], got '%s'\n", argv[1]);
    return 2;
  }
  double seconds = 0.2;
  if (argc == 3) {
    seconds = strtod(argv[2], &end);
    if (*end != '\0' || !(seconds > 0 && seconds <= 60)) {
      fprintf(stderr, "fma_peak: SECONDS_PER_REPETITION must be in (0, 60], got '%s'\n", argv[2]);
      return 2;
    }
  }
  enum kernel f = fp32_kernel(), b = bf16_kernel();
  const char* isa = f == kFp32Zmm ? "\"avx512f\"" : f == kFp32Ymm ? "\"avx2\"" : "null";
  printf("{\"threads\": %ld, \"fp32_isa\": %s, ", threads, isa);
  print_rate("fp32_gflops", measure(f, (int)threads, seconds));
  printf(", ");
  print_rate("bf16_gflops", measure(b, (int)threads, seconds));
  printf("}\n");
  return 0;
}
