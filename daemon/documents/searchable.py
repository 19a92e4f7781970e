"""Searchable PDFs: each page the original image, under an invisible text layer placed by the
OCR boxes, so selecting, copying and searching in any viewer gives the recognised text.

Built with pikepdf (qpdf underneath, what OCRmyPDF builds on) rather than PDF syntax by hand.
The text is drawn in render mode 3 (invisible) in a glyph-less font, as OCR tools do: a Type0
font, Identity-H, whose every code shows one glyph and whose ToUnicode map gives the code
back as the character — so any script, CJK included, needs no font file. The font (a TrueType
with one box-shaped glyph, never painted) is built here with fontTools; nothing is downloaded.
Each line is scaled (Tz) to its box's width and turned to its box's angle.

A JPEG with no EXIF turn is embedded as it is (its bytes, DCTDecode), and so are a PNG whose
pixels a PDF reader shows as they were read (its zlib stream with its row filters,
FlateDecode with the PNG predictors, as img2pdf embeds them) and a TIFF of CCITT G4 strips
(CCITTFaxDecode), what document scanners write: none is decoded again. Anything
else goes in as its decoded pixels (lossless, FlateDecode), since the boxes refer to the page
as it was read. Decoding and compressing those was most of a PDF's cost: a whole
`write_searchable_pdf` of a 300-dpi grey A4 PNG took 178 ms that way, 4 ms with the PNG's own
stream (the file read and hashed again included). A decoded page of only black and white (a
G4 TIFF in several strips, say, as libtiff and Pillow write them) goes in at a bit a pixel:
compressing a 300-dpi A4 scan's bits takes ~20 ms, its grey bytes ~90 ms, for a larger stream.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.results import Image, PageResult

GLYPH_ADVANCE = 500  # the empty glyph's width, in 1/1000 em
DEFAULT_DPI = 300.0  # a page without a resolution is taken for a 300 dpi scan
FONT = "/F0"

_font_lock = threading.Lock()
_font_program: bytes | None = None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Embedded:
    """A file's own compressed pixels, put in the PDF as they are: a JPEG's bytes
    (DCTDecode), a PNG's IDAT stream (FlateDecode, its row filters undone by the PNG
    predictors) or a TIFF frame's CCITT G4 strip (CCITTFaxDecode)."""

    width: int
    height: int
    data: bytes
    grey: bool
    bits: int = 8
    palette: bytes | None = None  # an indexed PNG's RGB entries
    pdf_filter: str = "/DCTDecode"
    decode_parms: tuple[tuple[str, int | bool], ...] = ()


@dataclass(frozen=True)
class ScannedPage:
    """One page to write: its pixels as read (BGR or grey), or the file's own compressed
    pixels when they show exactly those (`embedded`, and no `pixels`); its resolution; what
    was recognised on it."""

    pixels: Image | None
    result: PageResult
    dpi: float = DEFAULT_DPI
    embedded: Embedded | None = None

    @property
    def size(self) -> tuple[int, int]:
        """Width and height in pixels."""
        if self.embedded is not None:
            return self.embedded.width, self.embedded.height
        assert self.pixels is not None
        return self.pixels.shape[1], self.pixels.shape[0]


def png_stream(data: bytes) -> Embedded | None:
    """A PNG's own compressed pixels, where a PDF reader shows exactly what the daemon read:
    one non-interlaced frame of grey (1-8 bits), 8-bit RGB or indexed colour, with no
    transparency and no EXIF (which may turn the page). None for anything else (16 bits,
    alpha, an animation, a broken file)."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    header: tuple[int, ...] | None = None
    palette: bytes | None = None
    idat: list[bytes] = []
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            return None  # no IEND: truncated
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            return None
        if kind == b"IHDR" and length == 13:
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind in (b"tRNS", b"acTL", b"eXIf"):  # transparency, animation, a turn maybe
            return None
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        return None
    width, height, bits, colour, compression, filters, interlace = header
    if compression or filters or interlace:
        return None
    if colour == 0 and bits in (1, 2, 4, 8):
        colors = 1
    elif colour == 2 and bits == 8:
        colors = 3
    elif colour == 3 and bits in (1, 2, 4, 8) and palette and len(palette) % 3 == 0:
        colors = 1
    else:
        return None
    return Embedded(width, height, b"".join(idat), grey=colour == 0, bits=bits,
                    palette=palette if colour == 3 else None, pdf_filter="/FlateDecode",
                    decode_parms=(("Predictor", 15), ("Colors", colors),
                                  ("BitsPerComponent", bits), ("Columns", width)))


def g4_frames(image: Any, data: bytes) -> list[Embedded] | None:
    """Every frame of a TIFF (Pillow's `image`, of the file's `data`) as its own CCITT G4
    strip, where a PDF reader shows exactly the pages the daemon read: what document scanners
    write, one strip a frame, bits in the usual order, the first frame not turned by its
    orientation (the decoder turns that one). None for anything else."""
    if image.tag_v2.get(259) != 4:  # (before n_frames, which seeks through the file)
        return None
    frames = []
    try:
        for index in range(getattr(image, "n_frames", 1)):
            if index:
                image.seek(index)
            tags = image.tag_v2
            offsets, counts = tuple(tags.get(273, ())), tuple(tags.get(279, ()))
            photometric = tags.get(262)
            if (tags.get(259) != 4 or image.mode != "1" or len(offsets) != 1
                    or len(counts) != 1 or offsets[0] + counts[0] > len(data)
                    or tags.get(266, 1) != 1 or int(tags.get(293, 0)) & 2
                    or photometric not in (0, 1) or (index == 0 and tags.get(274, 1) != 1)):
                return None
            width, height = image.size
            frames.append(Embedded(
                width, height, data[offsets[0]:offsets[0] + counts[0]], grey=True, bits=1,
                pdf_filter="/CCITTFaxDecode",
                # G4; a BlackIsZero frame shows its white runs black
                decode_parms=(("K", -1), ("Columns", width), ("Rows", height),
                              ("BlackIs1", photometric == 1))))
    finally:
        if image.tell():
            image.seek(0)
    return frames


def scanned_pages(data: bytes, results: Sequence[PageResult], ocr: Any) -> list[ScannedPage]:
    """The pages of an image file as read for OCR, each with its stored result and the file's
    resolution. A JPEG without an EXIF turn, a PNG that `png_stream` takes and a TIFF that
    `g4_frames` takes are not decoded: their own compressed pixels are those (the boxes are
    in the file's pixels)."""
    from PIL import Image as PILImage

    from daemon.documents.decode import iter_pages

    with PILImage.open(io.BytesIO(data)) as image:
        # PNG keeps dots per metre: 200 dpi comes back as 199.9996
        dpi = round(float((image.info.get("dpi") or (DEFAULT_DPI,))[0] or DEFAULT_DPI), 1)
        dpi = dpi if dpi > 1 else DEFAULT_DPI
        single = image.format in ("JPEG", "PNG") and len(results) == 1 and getattr(
            image, "n_frames", 1) == 1
        embedded: list[Embedded] | None = None
        if (single and image.format == "JPEG" and image.mode in ("RGB", "L")
                and int(image.getexif().get(0x0112, 1) or 1) == 1):
            embedded = [Embedded(image.width, image.height, data, grey=image.mode == "L")]
        elif single and image.format == "PNG":  # (Pillow's getexif would decode a PNG)
            stream = png_stream(data)
            embedded = [stream] if stream is not None else None
        elif image.format == "TIFF":
            embedded = g4_frames(image, data)
            embedded = embedded if embedded is not None and len(embedded) == len(results) else None
        grey = image.mode == "L"
    if embedded is not None:
        return [ScannedPage(None, result, dpi, stream)
                for stream, result in zip(embedded, results, strict=True)]
    pages = []
    for page, result in zip(iter_pages(data, ocr), results, strict=False):
        if page.image is None:
            continue
        pixels = page.image[:, :, 0] if grey and page.image.ndim == 3 else page.image
        pages.append(ScannedPage(pixels, result, dpi))
    return pages


def glyphless_font() -> bytes:
    """A TrueType font whose glyphs (.notdef and one more, GLYPH_ADVANCE wide) are a plain
    em box. Never painted (render mode 3); but its box gives each character an extent:
    with empty glyphs pdfium found no text drawn at exactly 90 or 270 degrees (turned pages),
    and selection had no height."""
    global _font_program
    with _font_lock:
        if _font_program is None:
            from fontTools.fontBuilder import FontBuilder
            from fontTools.pens.ttGlyphPen import TTGlyphPen

            builder = FontBuilder(1000, isTTF=True)
            builder.setupGlyphOrder([".notdef", "blank"])
            builder.setupCharacterMap({0x20: "blank"})
            pen = TTGlyphPen(None)
            pen.moveTo((0, 0))
            pen.lineTo((0, 1000))
            pen.lineTo((GLYPH_ADVANCE, 1000))
            pen.lineTo((GLYPH_ADVANCE, 0))
            pen.closePath()
            box = pen.glyph()
            builder.setupGlyf({".notdef": box, "blank": box})
            builder.setupHorizontalMetrics({".notdef": (GLYPH_ADVANCE, 0),
                                            "blank": (GLYPH_ADVANCE, 0)})
            builder.setupHorizontalHeader(ascent=1000, descent=0)
            builder.setupNameTable({"familyName": "GlyphLessFont", "styleName": "Regular"})
            builder.setupOS2(sTypoAscender=1000, sTypoDescender=0, usWinAscent=1000,
                             usWinDescent=0)
            builder.setupPost()
            out = io.BytesIO()
            builder.save(out)
            _font_program = out.getvalue()
        return _font_program


def _to_unicode_cmap() -> bytes:
    """Code = UTF-16 unit of the BMP, mapped back to itself (256 ranges of 256: a bfrange may
    only step its last byte)."""
    ranges = [f"<{hi:02X}00> <{hi:02X}FF> <{hi:02X}00>" for hi in range(256)
              if not 0xD8 <= hi <= 0xDF]
    chunks = [ranges[i : i + 100] for i in range(0, len(ranges), 100)]
    body = "".join(f"{len(chunk)} beginbfrange\n" + "\n".join(chunk) + "\nendbfrange\n"
                   for chunk in chunks)
    return ("/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
            "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
            "/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
            "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
            f"{body}endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n"
            ).encode()


def _font(pdf: Any) -> Any:
    from pikepdf import Array, Dictionary, Name

    program = glyphless_font()
    font_file = pdf.make_stream(program)
    font_file.Length1 = len(program)
    descriptor = Dictionary(Type=Name.FontDescriptor, FontName=Name.GlyphLessFont, Flags=5,
                            FontBBox=Array([0, 0, GLYPH_ADVANCE, 1000]), ItalicAngle=0,
                            Ascent=1000, Descent=0, CapHeight=1000, StemV=80,
                            FontFile2=font_file)
    cid_font = Dictionary(
        Type=Name.Font, Subtype=Name.CIDFontType2, BaseFont=Name.GlyphLessFont,
        CIDSystemInfo=Dictionary(Registry="Adobe", Ordering="Identity", Supplement=0),
        FontDescriptor=descriptor, DW=GLYPH_ADVANCE,
        CIDToGIDMap=pdf.make_stream(zlib.compress(b"\x00\x01" * 65536, 9),
                                    Filter=Name.FlateDecode))
    return pdf.make_indirect(Dictionary(
        Type=Name.Font, Subtype=Name.Type0, BaseFont=Name.GlyphLessFont,
        Encoding=Name("/Identity-H"), DescendantFonts=Array([cid_font]),
        ToUnicode=pdf.make_stream(zlib.compress(_to_unicode_cmap(), 9),
                                  Filter=Name.FlateDecode)))


def _codes(text: str) -> str:
    """The text as the font's 2-byte codes (hex): BMP characters as themselves; beyond it,
    U+FFFD (a code is one UTF-16 unit here)."""
    codes = (ord(c) if ord(c) <= 0xFFFF and not 0xD800 <= ord(c) <= 0xDFFF else 0xFFFD
             for c in text)
    return "".join(f"{code:04X}" for code in codes)


Corners = tuple[tuple[float, float], ...]


def text_layer(result: PageResult, height_px: int, scale: float, font: str = FONT) -> str:
    """Content-stream operators drawing each line invisibly over its box (`scale`: points per
    pixel; PDF's y axis points up)."""
    return text_ops(((line.text, tuple((x * scale, (height_px - y) * scale)
                                       for x, y in line.box)) for line in result.lines), font)


def text_ops(lines: Iterable[tuple[str, Corners]], font: str = FONT) -> str:
    """Each line's text drawn invisibly over its box, given in the page's own space (points,
    y up; corners clockwise from the top left as the text reads)."""
    ops = []
    for raw, corners in lines:
        text = raw.strip()
        if not text:
            continue
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = corners
        angle = math.atan2(y1 - y0, x1 - x0)  # along the top edge
        width = math.hypot(x2 - x3, y2 - y3) or math.hypot(x1 - x0, y1 - y0)
        size = math.hypot(x3 - x0, y3 - y0)
        if width <= 0 or size <= 0:
            continue
        stretch = 100 * width / (len(text) * size * GLYPH_ADVANCE / 1000)
        cos, sin = math.cos(angle), math.sin(angle)
        ops.append(f"BT 3 Tr {font} {size:.2f} Tf {stretch:.2f} Tz "
                   f"{cos:.5f} {sin:.5f} {-sin:.5f} {cos:.5f} {x3:.2f} {y3:.2f} Tm "
                   f"<{_codes(text)}> Tj ET")
    return "\n".join(ops)


def searchable_from_pdf(data: bytes, results: Sequence[PageResult], ocr: Any) -> bytes:
    """The PDF itself, its pages untouched, each page that was OCR'd (source "ocr") gaining
    an invisible text layer; returned as it is when none was (its own text layer is usable).
    OCR boxes are in the pixels of the page as rendered for OCR; pdfium's own device-to-page
    transform (the inverse of that render, rotation and crop box included) places them."""
    import pikepdf
    from pikepdf import Name

    from daemon.documents.pdf import device_to_page

    wanted = [index for index, result in enumerate(results)
              if result.source == "ocr" and result.lines]
    if not wanted:
        return data
    maps = device_to_page(data, wanted, ocr)  # pdfium's part, under its lock
    with pikepdf.open(io.BytesIO(data)) as pdf:
        font = _font(pdf)
        for index in wanted:
            if index >= len(pdf.pages) or index not in maps:
                continue
            to_page = maps[index]
            lines = [(line.text, tuple(to_page(p) for p in line.box))
                     for line in results[index].lines]
            target = pikepdf.Page(pdf.pages[index])
            name = target.add_resource(font, Name.Font, prefix="OCR")
            target.contents_add(pdf.make_stream(b"q\n"), prepend=True)
            target.contents_add(pdf.make_stream(
                b"\nQ\n" + text_ops(lines, str(name)).encode()))
        out = io.BytesIO()
        pdf.save(out, compress_streams=True)
        return out.getvalue()


def black_and_white(plane: Image) -> bool:
    """Whether a grey page holds only black (0) and white (255), as a bilevel frame is read:
    such a page goes into a PDF at a bit a pixel. A grey scan fails on a sparse sample first."""

    def only_black_and_white(pixels: Image) -> bool:
        return bool(np.count_nonzero(pixels == 0) + np.count_nonzero(pixels == 255)
                    == pixels.size)

    return plane.dtype == np.uint8 and only_black_and_white(plane[::16, ::16]) and (
        only_black_and_white(plane))


def searchable_pdf(pages: Sequence[ScannedPage]) -> bytes:
    """A PDF of `pages`: each the image at its resolution, the text invisible over it."""
    import pikepdf
    from pikepdf import Array, Dictionary, Name

    pdf = pikepdf.new()
    font = _font(pdf)
    for page in pages:
        width_px, height_px = page.size
        embedded = page.embedded
        if embedded is not None:
            image = pdf.make_stream(embedded.data, Filter=Name(embedded.pdf_filter))
            if embedded.decode_parms:
                image.DecodeParms = Dictionary({f"/{key}": value
                                                for key, value in embedded.decode_parms})
            grey, bits = embedded.grey, embedded.bits
        else:
            assert page.pixels is not None
            grey = page.pixels.ndim == 2 or page.pixels.shape[2] == 1
            plane = page.pixels.reshape(page.pixels.shape[:2]) if grey else page.pixels
            bits = 1 if grey and black_and_white(plane) else 8
            if bits == 1:  # a bit a pixel, rows padded to a byte: 1 is white in DeviceGray
                samples = np.packbits(plane != 0, axis=1)
            else:
                samples = plane if grey else np.ascontiguousarray(plane[:, :, ::-1])
            image = pdf.make_stream(zlib.compress(samples.tobytes(), 6),
                                    Filter=Name.FlateDecode)
        image.Type, image.Subtype = Name.XObject, Name.Image
        image.Width, image.Height, image.BitsPerComponent = width_px, height_px, bits
        if embedded is not None and embedded.palette is not None:
            image.ColorSpace = Array([Name.Indexed, Name.DeviceRGB,
                                      len(embedded.palette) // 3 - 1,
                                      pikepdf.String(embedded.palette)])
        else:
            image.ColorSpace = Name.DeviceGray if grey else Name.DeviceRGB
        scale = 72.0 / (page.dpi or DEFAULT_DPI)
        width_pt, height_pt = width_px * scale, height_px * scale
        content = (f"q {width_pt:.4f} 0 0 {height_pt:.4f} 0 0 cm /Im0 Do Q\n"
                   + text_layer(page.result, height_px, scale))
        pdf.pages.append(pikepdf.Page(Dictionary(
            Type=Name.Page, MediaBox=Array([0, 0, width_pt, height_pt]),
            Resources=Dictionary(XObject=Dictionary(Im0=image), Font=Dictionary(F0=font)),
            Contents=pdf.make_stream(content.encode()))))
    out = io.BytesIO()
    pdf.save(out, compress_streams=True)
    return out.getvalue()
