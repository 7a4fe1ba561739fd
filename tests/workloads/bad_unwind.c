/* Workloads the stack walker must survive (tests/test_whole_stacks.py),
 * one per mode; each prints its pid, then runs until killed:
 *   spin        main -> outer_spin -> inner_spin, spinning (the test builds
 *               it without unwind tables, and as a copy with a corrupt
 *               .eh_frame)
 *   jit         main -> call_jit -> code copied into an anonymous PROT_EXEC
 *               mapping (no perf map, no unwind rows), spinning there
 *   deep N      recurse N frames deep, then spin
 *   burn MS     spin MS milliseconds and exit (short-lived processes) */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long sink;

__attribute__((noinline, noclone)) void inner_spin(void)
{
	for (;;)
		sink++;
}

__attribute__((noinline, noclone)) void outer_spin(void)
{
	inner_spin();
	sink = 0;	/* not a tail call: outer_spin stays on the stack */
}

/* x86-64: `1: incq (%rdi); jmp 1b` -- touches neither rsp nor rbp, like a
 * JIT's leaf code; the caller passes &sink in rdi. */
static const unsigned char jit_code[] = {0x48, 0xff, 0x07, 0xeb, 0xfb};

__attribute__((noinline, noclone)) void call_jit(void (*fn)(volatile unsigned long *))
{
	fn(&sink);
	sink = 0;
}

__attribute__((noinline, noclone)) unsigned long recurse(int n)
{
	volatile char pad[16];

	pad[n & 15] = (char)n;
	if (n <= 0)
		inner_spin();
	unsigned long r = recurse(n - 1);
	__asm__ volatile("" ::: "memory");	/* work after the call: no tail call, no loop */
	return r + pad[(n * 7) & 15];
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "spin";

	if (!strcmp(mode, "burn")) {
		double end = now() + (argc > 2 ? atof(argv[2]) : 10) / 1000;
		while (now() < end)
			sink++;
		return 0;
	}
	printf("%d\n", getpid());
	fflush(stdout);
	if (!strcmp(mode, "jit")) {
		void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED)
			return 1;
		memcpy(mem, jit_code, sizeof(jit_code));
		if (mprotect(mem, 4096, PROT_READ | PROT_EXEC))
			return 1;
		call_jit((void (*)(volatile unsigned long *))mem);
	} else if (!strcmp(mode, "deep")) {
		return (int)recurse(argc > 2 ? atoi(argv[2]) : 300);
	} else {
		outer_spin();
	}
	return (int)(sink & 1);
}
