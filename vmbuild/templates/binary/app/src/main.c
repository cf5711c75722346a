/* __NAME__: the job, a compiled program. Replace this with your own work.
 *
 * It runs once when the VM boots. Inputs given with `vmbuild run IMAGE.vmx --input PATH`
 * are under $VMBUILD_INPUT (read-only), each under its own base name; whatever it writes to
 * $RESULTS comes back to `--output-dir`. Its exit status becomes the status of `vmbuild run`.
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>

static long files;
static long long bytes;

static int count(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    /* vmbuild-input.json is the runner's own settings file, not an input */
    if (type == FTW_F && strcmp(path + ftw->base, "vmbuild-input.json") != 0) {
        printf("__NAME__: input %s (%lld bytes)\n", path, (long long)st->st_size);
        files++;
        bytes += st->st_size;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("__NAME__ 0.1 (built with gcc %s)\n", __VERSION__);
        return 0;
    }
    struct utsname un;
    uname(&un);
    printf("__NAME__: running on %s, %s %s, %d argument(s)\n", un.nodename, un.sysname,
           un.release, argc - 1);

    const char *input = getenv("VMBUILD_INPUT");
    if (input != NULL && input[0] != '\0') {
        if (nftw(input, count, 16, FTW_PHYS) != 0) {
            fprintf(stderr, "__NAME__: cannot read %s: %s\n", input, strerror(errno));
            return 1;
        }
    } else {
        printf("__NAME__: no inputs (give some with: vmbuild run IMAGE.vmx --input PATH)\n");
    }

    const char *results = getenv("RESULTS");
    char path[4096];
    snprintf(path, sizeof path, "%s/result.txt", results ? results : "/var/lib/job/output");
    FILE *out = fopen(path, "w");
    if (out == NULL) {
        fprintf(stderr, "__NAME__: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    fprintf(out, "%ld input file(s), %lld bytes\n", files, bytes);
    if (fclose(out) != 0) {
        fprintf(stderr, "__NAME__: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("__NAME__: done, wrote %s\n", path);
    return 0;
}
