/* SSL_read_ex() through Debian's real libssl N times, on an SSL object that
 * has no connect or accept state: each call goes through ssl_read_internal
 * and returns at once, so a uprobe on SSL_read_ex's entry (sub: single-
 * stepped) or on the internal function's (push: emulated) is what the loop
 * pays for. */
#include <stdlib.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;
	SSL_CTX *ctx = SSL_CTX_new(TLS_method());
	SSL *s = ctx ? SSL_new(ctx) : NULL;
	char buf[16];
	size_t got;

	if (!s)
		return 1;
	for (long i = 0; i < n; i++) {
		SSL_read_ex(s, buf, sizeof(buf), &got);
		ERR_clear_error();
	}
	SSL_free(s);
	SSL_CTX_free(ctx);
	return 0;
}
