# Builds the jobd zipapp. The last stage holds only /jobd, so research images can
#   COPY --from=jobd /jobd /bin/jobd
# The zipapp is pure Python: the same file runs on every CPU architecture with CPython >= 3.9.
FROM python:3.9-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml build.sh README.md ./
COPY jobd ./jobd
RUN ./build.sh

FROM scratch
COPY --from=build /src/dist/jobd /jobd
