"""Small nets the training tests share: two weight groups (and batch norm), many runs a test on 8 x 8 arrays."""

TINY = """\
net tiny
input image: 1 x 8 x 8
c1 = conv(image, 4, size=3) | relu | maxpool(2, stride=2)
f2 = fc(c1, 10)
output f2
"""

# TINY with batch norm after its conv (the same names besides)
NORMED = TINY.replace("| relu |", "| batchnorm | relu |")
