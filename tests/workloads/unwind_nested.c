/* Stack-walk workload for the unwind tables, built -O2 -fomit-frame-pointer
 * (no frame pointers, like distribution binaries): main -> level_a (a frame
 * that adjusts rsp) -> level_b (a variable-length array: the CFA follows
 * rbp) -> level_c, which spins until SIGALRM interrupts it; the handler
 * calls handler_leaf, which spins for good. A walk from handler_leaf then
 * crosses a signal frame (glibc's __restore_rt) back into level_c. */
#include <signal.h>
#include <string.h>
#include <sys/time.h>

volatile unsigned long sink;

__attribute__((noinline, noclone)) void handler_leaf(int sig)
{
	for (;;)
		sink += sig;
}

__attribute__((noinline, noclone)) void on_alarm(int sig)
{
	handler_leaf(sig);
	sink = 0;
}

__attribute__((noinline, noclone)) int level_c(char *buf, int n)
{
	struct itimerval it = { .it_value = { .tv_usec = 20000 } };
	setitimer(ITIMER_REAL, &it, 0);
	while (sink < ~0UL / 2)
		sink += buf[sink % n];
	return buf[0];
}

__attribute__((noinline, noclone)) int level_b(int n)
{
	char vla[n];
	memset(vla, n, n);
	return level_c(vla, n) + vla[n - 1];
}

__attribute__((noinline, noclone)) int level_a(int n)
{
	volatile char buf[256];
	buf[n & 255] = (char)n;
	return level_b(n + 16) + buf[(n * 7) & 255];
}

int main(int argc, char **argv)
{
	(void)argv;
	signal(SIGALRM, on_alarm);
	return level_a(argc) + (int)(sink & 1);	/* no tail call: main stays on the stack */
}
