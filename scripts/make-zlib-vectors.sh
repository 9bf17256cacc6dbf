#!/bin/sh
# Regenerates tests/data/zlib_vectors.txt: "<length> <level> <sha1 of zlib.compress(data, level)>"
# for data[i] = (7*i + i//251) mod 256, using Python's zlib (stock zlib) and hashlib.
python3 -c "import zlib,hashlib;[print(n,l,hashlib.sha1(zlib.compress(bytes((i*7+i//251)%256 for i in range(n)),l)).hexdigest()) for n in (0,1,100,65536,1000003,3145728) for l in (1,6,9)]" > "$(dirname "$0")/../tests/data/zlib_vectors.txt"
