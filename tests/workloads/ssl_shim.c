/* An "OpenSSL" whose exported calls give uprobe_placement nothing cheap:
 * built with -fcf-protection each starts with endbr64 (single-stepped) and
 * tail-jumps through a pointer to the real libssl (no direct call to follow).
 * LD_PRELOADed into a client, it sees every SSL call that client makes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
static int (*real_read)(SSL *, void *, int);
static int (*real_read_ex)(SSL *, void *, size_t, size_t *);
static int (*real_write)(SSL *, const void *, int);
static int (*real_write_ex)(SSL *, const void *, size_t, size_t *);
static int (*real_do_handshake)(SSL *);
static int (*real_set_fd)(SSL *, int);
static void (*real_free)(SSL *);

__attribute__((constructor)) static void find_real(void)
{
	void *real = dlopen("libssl.so.3", RTLD_NOW);

	real_read = dlsym(real, "SSL_read");
	real_read_ex = dlsym(real, "SSL_read_ex");
	real_write = dlsym(real, "SSL_write");
	real_write_ex = dlsym(real, "SSL_write_ex");
	real_do_handshake = dlsym(real, "SSL_do_handshake");
	real_set_fd = dlsym(real, "SSL_set_fd");
	real_free = dlsym(real, "SSL_free");
}

int SSL_read(SSL *s, void *b, int n) { return real_read(s, b, n); }
int SSL_read_ex(SSL *s, void *b, size_t n, size_t *c) { return real_read_ex(s, b, n, c); }
int SSL_write(SSL *s, const void *b, int n) { return real_write(s, b, n); }
int SSL_write_ex(SSL *s, const void *b, size_t n, size_t *c) { return real_write_ex(s, b, n, c); }
int SSL_do_handshake(SSL *s) { return real_do_handshake(s); }
int SSL_set_fd(SSL *s, int fd) { return real_set_fd(s, fd); }
void SSL_free(SSL *s) { real_free(s); }
