/* Loopback TCP load: "bulk BYTES" streams BYTES through one connection and
 * prints Gbit/s; "conns N" opens and closes N connections and prints
 * connections/s. The server is a forked child. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	static char buf[1 << 16];
	int bulk = argc > 2 && !strcmp(argv[1], "bulk");
	long amount = argc > 2 ? atol(argv[2]) : 0;
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
	pid_t child;
	double t0, t1;

	if (argc < 3 || lfd < 0)
		return 2;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 4096) ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len))
		return 1;
	child = fork();
	if (child == 0) {
		for (;;) {
			int c = accept(lfd, NULL, NULL);

			if (c < 0)
				_exit(1);
			while (read(c, buf, sizeof(buf)) > 0)
				;
			close(c);
		}
	}
	close(lfd);
	t0 = now();
	if (bulk) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
			return 1;
		for (long left = amount; left > 0;) {
			ssize_t n = write(fd, buf, left < (long)sizeof(buf) ? left : (long)sizeof(buf));

			if (n <= 0)
				return 1;
			left -= n;
		}
		shutdown(fd, SHUT_WR);
		while (read(fd, buf, sizeof(buf)) > 0)
			;
		close(fd);
		t1 = now();
		printf("%.3f\n", amount * 8 / (t1 - t0) / 1e9);
	} else {
		for (long i = 0; i < amount; i++) {
			int fd = socket(AF_INET, SOCK_STREAM, 0);

			if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
				return 1;
			shutdown(fd, SHUT_WR);
			while (read(fd, buf, sizeof(buf)) > 0)
				;
			close(fd);
		}
		t1 = now();
		printf("%.1f\n", amount / (t1 - t0));
	}
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	return 0;
}
