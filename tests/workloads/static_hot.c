/* CPU workload whose hot functions are both exported (in .dynsym with
 * -rdynamic) and static (only in .symtab): a stripped copy shows whether a
 * symbolizer finds the static ones in a debug file or MiniDebugInfo rather
 * than naming them after the exported function before them. Prints its pid,
 * then spins for argv[1] seconds: ~50% hot_exported, ~30% static_b, ~20%
 * static_c. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long sink;

__attribute__((noinline)) void hot_exported(long n)
{
	for (long i = 0; i < n; i++)
		sink += i * 7;
}

__attribute__((noinline)) static void static_b(long n)
{
	for (long i = 0; i < n; i++)
		sink ^= i * 5;
}

__attribute__((noinline)) static void static_c(long n)
{
	for (long i = 0; i < n; i++)
		sink += i ^ 3;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	double end = now() + (argc > 1 ? atof(argv[1]) : 3);

	printf("%d\n", getpid());
	fflush(stdout);
	while (now() < end) {
		hot_exported(500000);
		static_b(300000);
		static_c(200000);
	}
	return 0;
}
