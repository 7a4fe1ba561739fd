/* getppid() through libc's wrapper N times: a function a uprobe can hit
 * (bench/getppid_loop.c calls syscall() directly). */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;

	for (long i = 0; i < n; i++)
		getppid();
	return 0;
}
