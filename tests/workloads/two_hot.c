/* CPU workload with a known split: hot_a does 3x the loop iterations of
 * hot_b, so ~75% / ~25% of on-CPU time. Frame pointers kept, functions not
 * inlined, so stack walkers see main -> hot_a / hot_b. With "syscalls" it
 * instead spends its time in the kernel (write to /dev/null). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

__attribute__((noinline)) void hot_a(long n)
{
	for (long i = 0; i < n; i++)
		sink += i * 3;
}

__attribute__((noinline)) void hot_b(long n)
{
	for (long i = 0; i < n; i++)
		sink += i * 3;
}

__attribute__((noinline)) void syscall_heavy(int fd)
{
	static char buf[4096];

	for (int i = 0; i < 1000; i++)
		if (write(fd, buf, sizeof(buf)) < 0)
			exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 3.0;
	int syscalls = argc > 2 && !strcmp(argv[2], "syscalls");
	int fd = open("/dev/null", O_WRONLY);
	double end;

	printf("%d\n", getpid());
	fflush(stdout);
	end = now() + secs;
	while (now() < end) {
		if (syscalls) {
			syscall_heavy(fd);
		} else {
			hot_a(3000000);
			hot_b(1000000);
		}
	}
	return 0;
}
