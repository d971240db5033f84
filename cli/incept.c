// incept command-line program (verbs are added as the library grows).
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: incept VERB [options]\n");
        return 2;
    }
    fprintf(stderr, "incept: unknown verb '%s'\n", argv[1]);
    return 2;
}
