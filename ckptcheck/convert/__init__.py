"""Converters: any supported checkpoint to any supported format, one chunk of rows at a time.

``plan`` decides what moves where (names, rotary layout, dtype); ``stream`` produces each chunk;
``writers`` lay the chunks out in a format; ``atomic`` makes the output appear whole or not at all;
``verify`` compares the output with the input before ``api.convert`` reports success.
"""
