package switchboard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// maxWAVBytes bounds the samples ReadWAV takes (an hour of 48 kHz stereo).
const maxWAVBytes = 3600 * 48_000 * 2 * 2

// ReadWAV reads a WAV file of 16-bit PCM, mono or stereo (mixed down), and
// returns its samples as 16-bit little-endian mono PCM and their rate.
func ReadWAV(r io.Reader) ([]byte, int, error) {
	var header [12]byte
	if _, err := io.ReadFull(r, header[:]); err != nil {
		return nil, 0, fmt.Errorf("switchboard: not a WAV file: %w", err)
	}
	if string(header[0:4]) != "RIFF" || string(header[8:12]) != "WAVE" {
		return nil, 0, errors.New("switchboard: not a WAV file (no RIFF/WAVE header)")
	}
	var channels, bits uint16
	var rate uint32
	haveFormat := false
	for {
		var chunk [8]byte
		if _, err := io.ReadFull(r, chunk[:]); err != nil {
			return nil, 0, fmt.Errorf("switchboard: a WAV file without samples: %w", err)
		}
		id, size := string(chunk[0:4]), binary.LittleEndian.Uint32(chunk[4:8])
		switch id {
		case "fmt ":
			if size < 16 || size > 1024 {
				return nil, 0, fmt.Errorf("switchboard: a WAV format chunk of %d bytes", size)
			}
			format := make([]byte, size+size%2)
			if _, err := io.ReadFull(r, format); err != nil {
				return nil, 0, fmt.Errorf("switchboard: reading the WAV format: %w", err)
			}
			encoding := binary.LittleEndian.Uint16(format[0:2])
			channels = binary.LittleEndian.Uint16(format[2:4])
			rate = binary.LittleEndian.Uint32(format[4:8])
			bits = binary.LittleEndian.Uint16(format[14:16])
			if encoding != 1 && encoding != 0xFFFE || bits != 16 || channels < 1 || channels > 2 || rate == 0 {
				return nil, 0, fmt.Errorf("switchboard: not 16-bit mono or stereo PCM (format %d, %d bits, %d channels)",
					encoding, bits, channels)
			}
			haveFormat = true
		case "data":
			if !haveFormat {
				return nil, 0, errors.New("switchboard: WAV samples before their format")
			}
			// A streamed WAV says 0 or 0xFFFFFFFF: read to the end, within the bound.
			limit := int64(size)
			if size == 0 || size == 0xFFFFFFFF {
				limit = maxWAVBytes
			}
			if limit > maxWAVBytes {
				return nil, 0, fmt.Errorf("switchboard: a WAV of %d bytes is over the %d this reads", size, maxWAVBytes)
			}
			data, err := io.ReadAll(io.LimitReader(r, limit))
			if err != nil {
				return nil, 0, fmt.Errorf("switchboard: reading the WAV samples: %w", err)
			}
			frame := 2 * int(channels)
			data = data[:len(data)-len(data)%frame]
			if channels == 2 {
				mono := make([]byte, len(data)/2)
				for i := 0; i < len(data)/4; i++ {
					left := int32(int16(binary.LittleEndian.Uint16(data[4*i:])))
					right := int32(int16(binary.LittleEndian.Uint16(data[4*i+2:])))
					binary.LittleEndian.PutUint16(mono[2*i:], uint16(int16((left+right)/2)))
				}
				data = mono
			}
			return data, int(rate), nil
		default:
			if _, err := io.CopyN(io.Discard, r, int64(size+size%2)); err != nil {
				return nil, 0, fmt.Errorf("switchboard: skipping the WAV chunk %q: %w", id, err)
			}
		}
	}
}

// WriteWAV writes 16-bit little-endian mono PCM at rate as a WAV file.
func WriteWAV(w io.Writer, pcm []byte, rate int) error {
	pcm = pcm[:len(pcm)-len(pcm)%2]
	header := make([]byte, 44)
	copy(header[0:], "RIFF")
	binary.LittleEndian.PutUint32(header[4:], uint32(36+len(pcm)))
	copy(header[8:], "WAVEfmt ")
	binary.LittleEndian.PutUint32(header[16:], 16)
	binary.LittleEndian.PutUint16(header[20:], 1) // PCM
	binary.LittleEndian.PutUint16(header[22:], 1) // mono
	binary.LittleEndian.PutUint32(header[24:], uint32(rate))
	binary.LittleEndian.PutUint32(header[28:], uint32(rate*2))
	binary.LittleEndian.PutUint16(header[32:], 2)
	binary.LittleEndian.PutUint16(header[34:], 16)
	copy(header[36:], "data")
	binary.LittleEndian.PutUint32(header[40:], uint32(len(pcm)))
	if _, err := w.Write(header); err != nil {
		return err
	}
	_, err := w.Write(pcm)
	return err
}

// Resample converts 16-bit mono PCM from rate to target Hz by linear
// interpolation (enough for speech: recognition and playback alike).
func Resample(pcm []byte, rate, target int) []byte {
	pcm = pcm[:len(pcm)-len(pcm)%2]
	if rate == target || len(pcm) == 0 || rate <= 0 || target <= 0 {
		return pcm
	}
	count := len(pcm) / 2
	out := make([]byte, 2*(count*target/rate))
	step := float64(rate) / float64(target)
	sample := func(i int) float64 { return float64(int16(binary.LittleEndian.Uint16(pcm[2*i:]))) }
	for i := 0; i < len(out)/2; i++ {
		position := float64(i) * step
		left := int(position)
		right := min(left+1, count-1)
		value := sample(left) + (sample(right)-sample(left))*(position-float64(left))
		binary.LittleEndian.PutUint16(out[2*i:], uint16(int16(value)))
	}
	return out
}
