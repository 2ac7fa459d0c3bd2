#!/usr/bin/env bash
# Regenerates the fax documents engine/src/fax/document.rs is tested against, in
# engine/tests/fixtures/fax/. They are made with the tools fax servers and their users
# actually use (libtiff's tiffcp and tiff2pdf, ImageMagick), so the tests see real
# encoder output rather than what our own encoder thinks a fax looks like.
#
# Needs: apt-get install -y libtiff-tools imagemagick   (Debian bookworm)
#
# The pages are drawn from shapes only (no text: no dependency on installed fonts), at
# the A4 fax size: 1728 pixels wide, 2287 rows at "fine" resolution (204x196 dpi) and
# 1143 rows at "normal" resolution (204x98 dpi). The truth each decoded page is compared
# against is the drawn bitmap itself, kept as a 1-bit grayscale PNG (an uncompressed PBM
# of an A4 page is 494 KB, three of them would dwarf every other fixture; PNG is lossless
# and the `png` crate the engine already uses reads it back).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/engine/tests/fixtures/fax"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for tool in convert tiffcp tiff2pdf tiffinfo; do
  command -v "$tool" >/dev/null || {
    echo "make-fax-fixtures: $tool is missing: apt-get install -y libtiff-tools imagemagick" >&2
    exit 1
  }
done
mkdir -p "$out"
# The date tiff2pdf writes into the PDFs, fixed so a rerun makes the same bytes.
date=20261204000000

# draw NAME ROWS DRAW-ARGS...: a bilevel page, black shapes on white, as $work/NAME.pbm.
# +antialias and the threshold keep every pixel pure black or white.
draw() {
  local name=$1 rows=$2
  shift 2
  convert -size "1728x$rows" xc:white +antialias -fill black -stroke black "$@" \
    -threshold 50% -type bilevel "$work/$name.pbm"
}

# Page 1: a frame, a filled header bar, an outlined circle, diagonals and a checkerboard
# patch (many short runs, the hard case for run-length codes).
draw page1 2287 \
  -fill none -strokewidth 4 -draw "rectangle 40,40 1687,2246" \
  -fill black -strokewidth 1 -draw "rectangle 100,100 1628,260" \
  -fill none -strokewidth 9 -draw "circle 864,1100 864,1480" \
  -strokewidth 3 -draw "line 100,1800 1628,2150" -draw "line 100,2150 1628,1800" \
  -fill black -strokewidth 1 \
  -draw "rectangle 200,400 215,415" -draw "rectangle 232,400 247,415" \
  -draw "rectangle 216,416 231,431" -draw "rectangle 248,416 263,431" \
  -draw "rectangle 200,432 215,447" -draw "rectangle 232,432 247,447"

# Page 2: filled shapes, and black that touches the left and right edges (columns 0 and
# 1727) and the first and last rows, where decoders get their bounds wrong.
draw page2 2287 \
  -strokewidth 1 -draw "circle 400,500 400,780" -draw "ellipse 1200,1500 300,150 0,360" \
  -draw "polygon 200,1900 700,1300 1100,2100" \
  -draw "rectangle 0,0 0,2286" -draw "rectangle 1727,0 1727,2286" \
  -draw "rectangle 0,0 1727,1" -draw "rectangle 0,2285 1727,2286" \
  -draw "line 864,200 866,1200"

# Page 3: a full-width black band, thin stripes, one-pixel dots along a line.
draw page3 2287 \
  -strokewidth 1 -draw "rectangle 0,300 1727,420" \
  -draw "rectangle 100,600 1600,602" -draw "rectangle 100,640 1600,641" \
  -draw "rectangle 100,680 1600,680" -draw "polygon 864,900 1400,1900 328,1900" \
  -draw "point 10,2000" -draw "point 20,2000" -draw "point 1717,2000" -draw "point 1726,2000"

# The normal-resolution page: page 1 with every other row, as a fax machine sending
# "normal" scans it (half as many rows, each twice as tall).
convert "$work/page1.pbm" -sample 100%x50% -type bilevel "$work/normal.pbm"

# The truth, as 1-bit grayscale PNGs (-strip: no dates, so a rerun makes the same bytes).
for page in page1 page2 page3 normal; do
  convert "$work/$page.pbm" -strip -define png:color-type=0 -define png:bit-depth=1 "$out/$page.png"
done

# tiff RES PBM OUT: a one-page Group 4 TIFF as ImageMagick writes it (WhiteIsZero, as
# faxes are), at resolution RES, the input tiffcp recodes below.
tiff() {
  convert "$2" -density "$1" -units PixelsPerInch -compress Group4 "$3"
}
for page in page1 page2 page3; do
  tiff 204x196 "$work/$page.pbm" "$work/$page.tif"
done
tiff 204x98 "$work/normal.pbm" "$work/normal.tif"
pages=("$work/page1.tif" "$work/page2.tif" "$work/page3.tif")

# Fine resolution, three pages, in each coding a fax server stores:
tiffcp -c g4 "${pages[@]}" "$out/fine-g4.tif"                    # T.6 (MMR)
tiffcp -c g3:1d "${pages[@]}" "$out/fine-g3.tif"                 # T.4 1-D (MH)
tiffcp -c g3:2d "${pages[@]}" "$out/fine-g3-2d.tif"              # T.4 2-D (MR)
# HylaFAX's own files: FillOrder 2 (bits reversed in each byte), EOLs byte-aligned.
tiffcp -f lsb2msb -c g3:1d:fill "${pages[@]}" "$out/fine-g3-lsb.tif"

# Normal resolution, one page, big-endian ("MM"), T.4 1-D.
tiffcp -B -c g3:1d "$work/normal.tif" "$out/normal-g3.tif"

# A PDF of the three-page G4 TIFF, as HylaFAX makes it (tiff2pdf copies the G4 data
# into CCITTFaxDecode images, K -1). ImageMagick's PDF writer is disabled by Debian's
# security policy, tiff2pdf is the tool fax servers use anyway.
tiff2pdf -e "$date" -o "$out/fine-g4.pdf" "$out/fine-g4.tif"

# A BlackIsZero (PhotometricInterpretation 1) G4 page, and the PDF tiff2pdf makes of it
# (it sets BlackIs1 true there): the inverted polarity has to come out black on white.
convert "$work/page2.pbm" -density 204x196 -units PixelsPerInch -compress none "$work/page2-mb.tif"
tiffcp -c g4 "$work/page2-mb.tif" "$out/page2-blackiszero-g4.tif"
tiff2pdf -e "$date" -o "$out/page2-blackiszero-g4.pdf" "$out/page2-blackiszero-g4.tif"

# Uncompressed (Compression 1, BlackIsZero as ImageMagick writes it): a 48-row band of
# page 1 (rows 80 to 127, across the header bar), so it stays small.
convert "$work/page1.pbm" -crop 1728x48+0+80 +repage -density 204x196 -units PixelsPerInch \
  -compress none "$out/page1-band-uncompressed.tif"

# What the engine must refuse: LZW, not a fax coding (a small page).
convert -size 64x64 xc:white -fill black -draw "rectangle 8,8 40,40" -type bilevel \
  -compress none "$work/small.tif"
tiffcp -c lzw "$work/small.tif" "$out/small-lzw.tif"

# Check the codings came out as meant (the tests rely on them).
expect() {
  tiffinfo "$1" | grep -q "$2" || {
    echo "make-fax-fixtures: $1 lacks \"$2\"" >&2
    exit 1
  }
}
expect "$out/fine-g4.tif" "CCITT Group 4"
expect "$out/fine-g3.tif" "CCITT Group 3"
expect "$out/fine-g3-2d.tif" "2-d encoding"
expect "$out/fine-g3-lsb.tif" "FillOrder: lsb-to-msb"
expect "$out/normal-g3.tif" "Resolution: 204, 98"
expect "$out/page2-blackiszero-g4.tif" "min-is-black"
expect "$out/page1-band-uncompressed.tif" "Compression Scheme: None"
expect "$out/small-lzw.tif" "LZW"

du -ch "$out"/* | tail -1
