/* A known syscall workload: N getppid() calls and M nanosleep()s of S ns,
 * made with syscall(2) so libc cannot cache or substitute them (glibc's
 * nanosleep() would issue clock_nanosleep). Waits for a line on stdin first,
 * so the test knows the pid before any counted syscall happens. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n_getppid, n_sleep, sleep_ns;
	char line[16];
	struct timespec ts;

	if (argc != 4) {
		fprintf(stderr, "usage: %s N_GETPPID N_SLEEP SLEEP_NS\n", argv[0]);
		return 2;
	}
	n_getppid = atol(argv[1]);
	n_sleep = atol(argv[2]);
	sleep_ns = atol(argv[3]);
	printf("%d\n", getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < n_getppid; i++)
		syscall(SYS_getppid);
	ts.tv_sec = sleep_ns / 1000000000L;
	ts.tv_nsec = sleep_ns % 1000000000L;
	for (long i = 0; i < n_sleep; i++)
		syscall(SYS_nanosleep, &ts, NULL);
	printf("done\n");
	fflush(stdout);
	/* stay alive until told, so the agent reads our counts while we exist */
	if (!fgets(line, sizeof(line), stdin))
		return 0;
	return 0;
}
